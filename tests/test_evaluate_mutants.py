"""Evaluation checks that kill mutants the older tests let through (bench/mutation.py)."""

import json

import numpy as np
import pytest

from ddpmseg.core.errors import BadInputError, ConfigError, InputNotFoundError
from ddpmseg.outputs.evaluate import (
    confusion_axis,
    confusion_matrix,
    evaluate,
    format_table,
    image_iou,
    iou_from_confusion,
)
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo


def row(index, name, iou, gt, pred, inter, union):
    return {"index": index, "name": name, "iou": iou, "gt_pixels": gt, "pred_pixels": pred,
            "intersection": inter, "union": union}


def test_the_table_layout():
    # Names are at least 5 and at most 40 wide (longer ones end in ".."); number columns are
    # one wider than the longest union, at least 9.
    result = {"classes": [row(0, "background", 0.5, 10, 12, 6, 16),
                          row(7, "a" * 45, 0.0, 1234567890, 0, 0, 1234567890)],
              "miou": 0.25, "num_images": 3, "ignore_label": 255, "mask_ignore": True}
    rule = "-" * 107
    assert format_table(result).splitlines() == [
        " idx  " + "class".ljust(40) + "  " + "IoU %".rjust(7) + "  " + "gt px".rjust(11)
        + "  " + "pred px".rjust(11) + "  " + "inter".rjust(11) + "  " + "union".rjust(11),
        rule,
        "   0  " + "background".ljust(40) + "  " + "50.00".rjust(7) + "  " + "10".rjust(11)
        + "  " + "12".rjust(11) + "  " + "6".rjust(11) + "  " + "16".rjust(11),
        "   7  " + "a" * 38 + "..     0.00   1234567890            0            0   1234567890",
        rule,
        "mIoU 25.00 % over 2 classes, 3 images (ignore label 255: masked out)"]


def test_the_table_of_a_short_result():
    result = {"classes": [row(1, "cat", 1 / 3, 1, 2, 1, 2)], "miou": 1 / 3}
    assert format_table(result).splitlines() == [
        " idx  class    IoU %      gt px    pred px      inter      union",
        "-" * 64,
        "   1  cat      33.33          1          2          1          2",
        "-" * 64,
        "mIoU 33.33 % over 1 classes, ? images (ignore label None: not masked (reference))"]


def test_iou_rows_by_hand():
    # gt\pred counts over classes 0..2 and the ignore label 3 (inside the matrix).
    conf = np.zeros((256, 256), dtype=np.int64)
    conf[0, 0], conf[0, 1], conf[1, 1], conf[1, 0], conf[2, 1] = 5, 1, 2, 3, 4
    conf[3, 0], conf[3, 2] = 7, 2
    rows, miou = iou_from_confusion(conf, 4, ignore_label=3)
    # class 0: inter 5, gt 6, pred 5 + 3 + 7 = 15, union 16; class 1: 2 / (5 + 7 - 2);
    # class 2: 0 / (4 + 2); class 3 is the ignore label: no row.
    assert [(r["index"], r["intersection"], r["gt_pixels"], r["pred_pixels"], r["union"])
            for r in rows] == [(0, 5, 6, 15, 16), (1, 2, 5, 7, 10), (2, 0, 4, 2, 6)]
    assert miou == pytest.approx((5 / 16 + 2 / 10 + 0) / 3)
    rows, miou = iou_from_confusion(conf, 4, ignore_label=3, mask_ignore=True)
    # The ignore label's gt row is dropped: class 0 loses 7 predicted pixels, class 2 two.
    assert [(r["pred_pixels"], r["union"]) for r in rows] == [(8, 9), (7, 10), (0, 4)]
    assert miou == pytest.approx((5 / 9 + 2 / 10 + 0) / 3)
    # The input is not changed by masking.
    assert conf[3, 0] == 7
    # An ignore label outside the matrix masks nothing.
    assert iou_from_confusion(conf, 3, ignore_label=300, mask_ignore=True)[1] == \
        pytest.approx(iou_from_confusion(conf, 3, ignore_label=300)[1])


def test_an_image_iou_counts_only_its_classes():
    pred = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    gt = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    conf = confusion_matrix(pred, gt)
    # class 0: 1 / 2; class 1: 2 / 3; class 2 absent from both: left out, not counted as 0.
    assert image_iou(conf, 3, ignore_label=255) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert image_iou(np.zeros((256, 256), np.int64), 3, ignore_label=255) == 0.0


def test_confusion_axis_names_the_ignore_label():
    assert confusion_axis([0, 1, 255], ["sky", "road"], 255) == ["0 sky", "1 road", "255 ignore"]


def test_a_forty_character_name_is_shown_whole():
    result = {"classes": [row(0, "b" * 40, 0.5, 1, 1, 1, 2)], "miou": 0.5}
    assert "   0  " + "b" * 40 + "    50.00" in format_table(result)


def test_no_class_left_gives_miou_zero():
    # One class, and it is the ignore label: no rows, mIoU 0 (not the mean of nothing).
    assert iou_from_confusion(np.ones((256, 256), np.int64), 1, ignore_label=0) == ([], 0.0)


def save(folder, name, labels):
    folder.mkdir(exist_ok=True)
    np.save(folder / f"{name}.npy", np.asarray(labels, dtype=np.uint8))


def save_pred(folder, name, labels):
    """A prediction, listed in predict.json as a finished predict lists it."""
    save(folder, name, labels)
    path = folder / "predict.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta["names"] = sorted(set(meta.get("names", [])) | {name})
    path.write_text(json.dumps(meta))


def test_the_result_by_hand(tmp_path):
    # gt [[0, 1], [255, 1]], pred [[0, 1], [1, 0]], 2 classes:
    # unmasked: class 0 1/2, class 1 1/3; masking the ignore pixel: class 1 1/2.
    save_pred(tmp_path / "p", "a", [[0, 1], [1, 0]])
    save(tmp_path / "g", "a", [[0, 1], [255, 1]])
    r = evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, mask_ignore=True,
                 confusion=True, write=False)
    assert r["miou"] == pytest.approx(0.5) and r["per_image"] == {"a": pytest.approx(0.5)}
    assert (r["num_classes"], r["ignore_label"], r["ignore_pixels"], r["total_pixels"]) == \
        (2, 255, 1, 4)
    assert r["confusion"] == {"labels": [0, 1, 255], "matrix": [[1, 0, 0], [1, 1, 0], [0, 1, 0]]}
    r = evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, write=False)
    assert r["per_image"] == {"a": pytest.approx((1 / 2 + 1 / 3) / 2)}


def test_an_ignore_label_outside_the_matrix_ignores_nothing(tmp_path):
    save_pred(tmp_path / "p", "a", [[0, 1]])
    save(tmp_path / "g", "a", [[0, 0]])
    r = evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, ignore_label=200, write=False)
    assert r["ignore_pixels"] == 0 and r["total_pixels"] == 2


def test_resize_takes_the_nearest_mask_pixel(tmp_path):
    save_pred(tmp_path / "p", "a", [[0, 1], [1, 1]])
    save(tmp_path / "g", "a", np.kron([[0, 1], [1, 0]], np.ones((2, 2), np.uint8)))
    r = evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, resize=True, write=False)
    # gt at 2x2 is [[0, 1], [1, 0]]: class 0 1/2, class 1 2/3.
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and r["resize"] is True


def test_the_confusion_files_name_an_ignore_label_just_past_the_classes(tmp_path):
    save_pred(tmp_path / "p", "a", [[0, 1], [1, 0]])
    save(tmp_path / "g", "a", [[0, 1], [2, 1]])
    r = evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, ignore_label=2,
                 class_names=("sky", "road"), confusion=True, out=tmp_path / "m")
    header = (tmp_path / "m" / "confusion.csv").read_text().splitlines()[0]
    assert header == "gt \\ pred,0:sky,1:road,2:ignore"
    assert r["confusion_png"] == str(tmp_path / "m" / "confusion.png")
    assert (tmp_path / "m" / "confusion.png").is_file()


def test_the_errors_say_how_to_fix_them(tmp_path):
    save_pred(tmp_path / "p", "a", [[0, 1]])
    save(tmp_path / "g", "b", [[0, 1]])
    with pytest.raises(ConfigError) as err:
        evaluate(tmp_path / "p", tmp_path / "g", num_classes=0, write=False)
    assert str(err.value) == ("num_classes must be 1..256, got 0; give `num_classes=N` with N "
                              "in 1..256")
    with pytest.raises(InputNotFoundError) as err:
        evaluate(tmp_path / "p", tmp_path / "nothing", num_classes=2, write=False)
    assert str(err.value).endswith("; give the folder of test masks (<name>.npy or PNG), or a "
                                   "store with labels")
    with pytest.raises(BadInputError) as err:
        evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, write=False)
    assert str(err.value).endswith("; give the folder holding the test masks, rename the "
                                   "masks, or remove the prediction")


def test_a_store_with_labels_is_the_ground_truth(tmp_path):
    # The masks as extract stored them; a folder beside it with other masks must not be read.
    spec = FeatureSpec(steps=(1,), blocks=(5,), shapes=((2, 2, 2),), image_size=(2, 2),
                       backbone={"sha256": "f" * 64})
    info = StoreInfo(spec=spec, num_images=1, names=("a",), num_classes=2, ignore_label=255,
                     class_names=("c0", "c1"), has_labels=True)
    store = FeatureStore.create(tmp_path / "s.zarr", info)
    store.write_image(0, [np.zeros((2, 2, 2), np.float32)], np.array([[0, 1], [1, 1]], np.uint8))
    save_pred(tmp_path / "p", "a", [[0, 1], [0, 1]])
    r = evaluate(tmp_path / "p", tmp_path / "s.zarr", num_classes=2, write=False)
    # class 0: 1 / 2, class 1: 2 / 3
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and r["names"] == ["a"]


def test_max_image_pixels_reaches_the_masks_evaluate_and_report_read(tmp_path):
    from PIL import Image

    from ddpmseg.outputs.report import report

    save_pred(tmp_path / "p", "a", np.zeros((40, 50)))
    (tmp_path / "g").mkdir()
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "g" / "a_mask.png")
    with pytest.raises(BadInputError, match=r"a_mask\.png is 50x40 = 2000 pixels, above the "
                                            r"limit of 1999"):
        evaluate(tmp_path / "p", tmp_path / "g", num_classes=2, max_image_pixels=1999)
    assert evaluate(tmp_path / "p", tmp_path / "g", num_classes=2,
                    max_image_pixels=2000)["miou"] == 0.5
    meta = json.loads((tmp_path / "p" / "predict.json").read_text())
    (tmp_path / "p" / "predict.json").write_text(json.dumps({**meta, "num_classes": 2}))
    with pytest.raises(BadInputError, match="limit of 1999"):
        report(tmp_path / "p", gt=tmp_path / "g", max_image_pixels=1999)
    assert report(tmp_path / "p", gt=tmp_path / "g", max_image_pixels=2000).is_file()


def test_the_folder_schema_is_one_definition(tmp_path):
    from ddpmseg.outputs import folder

    # The label maps of a folder: no overlay, uncertainty map or folder picture among them.
    for name in ("a.npy", "a_entropy.npy", "a_jsd.npy", "b.npy", "a.png", "summary.png"):
        (tmp_path / name).write_bytes(b"")
    assert list(folder.list_predictions(tmp_path)) == ["a", "b"]
    assert folder.uncertainty_maps(tmp_path, "a") == (tmp_path / "a_entropy.npy",
                                                      tmp_path / "a_jsd.npy")
    assert folder.uncertainty_maps(tmp_path, "b") is None
    assert folder.read_meta(tmp_path) == {}
    with pytest.raises(AssertionError, match="predict.json.s keys"):
        folder.write_meta(tmp_path, {"names": []})
    assert not (tmp_path / folder.META_FILE).exists()

"""The reference's mIoU on hand-made masks, the strict variant, and evaluate's files and errors."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ddpmseg.core.errors import BadInputError, ConfigError, InputNotFoundError
from ddpmseg.outputs.evaluate import evaluate, format_table, iou_from_confusion, confusion_matrix

# Two images, classes 0..3 (class 3 never appears: empty union -> IoU 0), ignore label 255.
GT1 = [[0, 0, 1, 1], [2, 2, 255, 255]]
PR1 = [[0, 1, 1, 1], [2, 0, 2, 0]]
GT2 = [[1, 1, 1, 1], [0, 0, 0, 255]]
PR2 = [[1, 1, 0, 1], [0, 0, 0, 1]]

# By hand, summed over both images (reference: ignore pixels NOT masked):
#   class 0: inter 1 + 3 = 4, union 4 + 4 = 8   -> 1/2
#   class 1: inter 2 + 3 = 5, union 3 + 5 = 8   -> 5/8
#   class 2: inter 1,         union 3           -> 1/3
#   class 3: empty union                         -> 0
DEFAULT_IOUS = [1 / 2, 5 / 8, 1 / 3, 0.0]
# Masking the ignore pixels (img1 (1,2) pred 2, (1,3) pred 0; img2 (1,3) pred 1) first:
#   class 0: 4 / 7, class 1: 5 / 7, class 2: 1 / 2, class 3: 0
MASKED_IOUS = [4 / 7, 5 / 7, 1 / 2, 0.0]


def write_pair(pred_dir, gt_dir, name, pred, gt, gt_png=False):
    np.save(pred_dir / f"{name}.npy", np.asarray(pred, dtype=np.uint8))
    listed(pred_dir, name)
    if gt_png:
        Image.fromarray(np.asarray(gt, dtype=np.uint8), mode="L").save(gt_dir / f"{name}.png")
    else:
        np.save(gt_dir / f"{name}.npy", np.asarray(gt, dtype=np.uint8))


def listed(pred_dir, name):
    """predict.json lists ``name``, as predict's does (evaluate refuses a folder without)."""
    path = pred_dir / "predict.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta["names"] = sorted(set(meta.get("names", [])) | {name})
    path.write_text(json.dumps(meta))


@pytest.fixture
def dirs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    write_pair(pred, gt, "a", PR1, GT1)
    write_pair(pred, gt, "b", PR2, GT2, gt_png=True)  # a grey PNG mask works too
    return pred, gt


def test_reference_miou_by_hand(dirs):
    pred, gt = dirs
    res = evaluate(pred, gt, num_classes=4, ignore_label=255)
    assert [r["iou"] for r in res["classes"]] == pytest.approx(DEFAULT_IOUS)
    assert res["miou"] == pytest.approx(sum(DEFAULT_IOUS) / 4)
    assert res["miou"] == pytest.approx(0.3645833333)
    row0 = res["classes"][0]
    assert (row0["intersection"], row0["union"], row0["gt_pixels"], row0["pred_pixels"]) == \
        (4, 8, 5, 7)
    assert res["classes"][3]["union"] == 0
    assert res["num_images"] == 2 and res["ignore_pixels"] == 3


def test_mask_ignore_by_hand(dirs):
    pred, gt = dirs
    res = evaluate(pred, gt, num_classes=4, ignore_label=255, mask_ignore=True)
    assert [r["iou"] for r in res["classes"]] == pytest.approx(MASKED_IOUS)
    assert res["miou"] == pytest.approx(sum(MASKED_IOUS) / 4)


def test_ignore_label_inside_class_range(tmp_path):
    # bedroom_28 style: ignore label 0 is a class index, left out of the mean.
    # gt [[0,1],[2,2]], pred [[1,1],[2,0]], classes 1 and 2:
    #   default: class 1 inter 1, union 2 (pred 1 on the ignore pixel counts) -> 1/2;
    #            class 2 inter 1, union 2 -> 1/2; mIoU 1/2
    #   masked:  class 1 -> 1/1; class 2 -> 1/2; mIoU 3/4
    pred, gt = tmp_path / "p", tmp_path / "g"
    pred.mkdir()
    gt.mkdir()
    write_pair(pred, gt, "x", [[1, 1], [2, 0]], [[0, 1], [2, 2]])
    res = evaluate(pred, gt, num_classes=3, ignore_label=0, write=False)
    assert [r["index"] for r in res["classes"]] == [1, 2]
    assert [r["iou"] for r in res["classes"]] == pytest.approx([0.5, 0.5])
    assert res["miou"] == pytest.approx(0.5)
    masked = evaluate(pred, gt, num_classes=3, ignore_label=0, mask_ignore=True, write=False)
    assert masked["miou"] == pytest.approx(0.75)


def reference_compute_iou(preds, gts, num_classes, ignore_label):
    """The reference's compute_iou, restated: per-class counters summed over the test set."""
    unions, inters = Counter(), Counter()
    for p, g in zip(preds, gts):
        for c in range(num_classes):
            if c == ignore_label:
                continue
            pc, gc = (p == c).astype(int), (g == c).astype(int)
            unions[c] += (pc | gc).sum()
            inters[c] += (pc & gc).sum()
    ious = [inters[c] / (1e-8 + unions[c]) for c in range(num_classes) if c != ignore_label]
    return float(np.mean(ious))


@pytest.mark.parametrize("ignore", [255, 0])
def test_matches_reference_formula_on_random_masks(tmp_path, ignore):
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    preds, gts = [], []
    for k in range(3):
        g = rng.integers(0, 6, size=(17, 13)).astype(np.uint8)
        if ignore == 255:
            g[rng.random(g.shape) < 0.2] = 255
        p = rng.integers(0, 5, size=(17, 13)).astype(np.uint8)  # class 5 never predicted
        preds.append(p)
        gts.append(g)
        write_pair(pred_dir, gt_dir, f"img{k}", p, g)
    res = evaluate(pred_dir, gt_dir, num_classes=7, ignore_label=ignore, write=False)
    assert res["miou"] == pytest.approx(reference_compute_iou(preds, gts, 7, ignore), abs=1e-7)


def test_confusion_counts():
    conf = confusion_matrix(np.array([[0, 1], [1, 1]]), np.array([[0, 0], [1, 255]]))
    assert conf[0, 0] == 1 and conf[0, 1] == 1 and conf[1, 1] == 1 and conf[255, 1] == 1
    rows, miou = iou_from_confusion(conf, 2, 255)
    # class 0: inter 1, union 2; class 1: inter 1, union 3 (two predictions + one gt, one shared)
    assert [r["iou"] for r in rows] == pytest.approx([1 / 2, 1 / 3])


def test_writes_metrics_confusion_and_table(dirs, tmp_path):
    pred, gt = dirs
    out = tmp_path / "metrics"
    res = evaluate(pred, gt, num_classes=4, ignore_label=255, confusion=True, out=out,
                   class_names=("bg", "head", "hair", "hat"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["miou"] == pytest.approx(res["miou"])
    assert [r["name"] for r in saved["classes"]] == ["bg", "head", "hair", "hat"]
    with open(out / "confusion.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == ["0:bg", "1:head", "2:hair", "3:hat", "255:ignore"]
    assert table[1][1:3] == ["4", "1"]  # gt 0 predicted 0 four times, 1 once
    with Image.open(out / "confusion.png") as im:
        assert im.mode == "RGB"
    text = format_table(res)
    assert "head" in text and "62.50" in text
    assert "mIoU 36.46 %" in text.splitlines()[-1]


def test_uses_predict_json_for_classes(dirs):
    pred, gt = dirs
    (pred / "predict.json").write_text(json.dumps(
        {"num_classes": 4, "ignore_label": 255, "class_names": ["a", "b", "c", "d"],
         "names": ["a", "b"]}))
    # predict's other outputs are not mistaken for predictions
    np.save(pred / "a_entropy.npy", np.zeros((2, 4), np.float32))
    Image.new("RGB", (4, 2)).save(pred / "a_overlay.png")
    res = evaluate(pred, gt, write=False)
    assert res["miou"] == pytest.approx(sum(DEFAULT_IOUS) / 4)
    assert res["names"] == ["a", "b"]


def test_missing_ground_truth_names_the_file(dirs):
    pred, gt = dirs
    np.save(pred / "c.npy", np.zeros((2, 4), np.uint8))
    with pytest.raises(BadInputError, match=r"c\.npy"):
        evaluate(pred, gt, num_classes=4, ignore_label=255)
    assert not (pred / "metrics.json").exists()


def test_size_mismatch_names_the_files(dirs):
    pred, gt = dirs
    np.save(pred / "a.npy", np.zeros((3, 4), np.uint8))
    with pytest.raises(BadInputError, match=r"a\.npy is 4x3 .*a\.npy is 4x2"):
        evaluate(pred, gt, num_classes=4, ignore_label=255)


def test_bad_labels_and_missing_dirs(dirs, tmp_path):
    pred, gt = dirs
    with pytest.raises(BadInputError, match="outside"):
        evaluate(pred, gt, num_classes=2, ignore_label=255)  # gt holds class 2
    with pytest.raises(InputNotFoundError, match="nowhere"):
        evaluate(tmp_path / "nowhere", gt, num_classes=4, ignore_label=255)
    with pytest.raises(InputNotFoundError):
        evaluate(pred, tmp_path / "nowhere", num_classes=4, ignore_label=255)
    with pytest.raises(ConfigError, match="`num_classes=N`"):
        evaluate(pred, gt)  # no predict.json, no num_classes


def test_ground_truth_under_another_name_is_named_and_lossy_is_refused(tmp_path):
    from ddpmseg.outputs.evaluate import find_ground_truth

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "p_label.png")
    with pytest.raises(BadInputError) as err:
        find_ground_truth(tmp_path, "p")
    assert "none of p.npy, p_mask.png, p_mask.npy or a grey/palette p.png" in str(err.value)
    assert "p_label.png is not one of these names" in str(err.value)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "p_mask.jpg")
    with pytest.raises(BadInputError, match=r"p_mask\.jpg is a lossy JPG file"):
        find_ground_truth(tmp_path, "p")


def test_a_folder_no_predict_finished_is_refused_and_nothing_written(dirs):
    pred, gt = dirs
    (pred / "b.npy").unlink()  # listed, missing
    with pytest.raises(InputNotFoundError, match=r"incomplete: 1 of the 2 images .*\(b\.npy\)"):
        evaluate(pred, gt, num_classes=4, ignore_label=255)
    (pred / "predict.json").unlink()  # label maps without predict.json: a killed predict
    with pytest.raises(InputNotFoundError, match="has no predict.json"):
        evaluate(pred, gt, num_classes=4, ignore_label=255)
    assert sorted(p.name for p in pred.iterdir()) == ["a.npy"]

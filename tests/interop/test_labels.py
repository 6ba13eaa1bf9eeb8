"""labels export / import: every format, round trips bit for bit, errors before any write."""

import json
import logging
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.cli.main import cli
from ddpmseg.core.errors import BadInputError, InputNotFoundError
from ddpmseg.interop.labels.api import export_labels, import_labels
from ddpmseg.interop.labels.label_studio import decode_rle, encode_rle, mask_to_rle, rle_to_mask
from ddpmseg.interop.labels.voc import VOC_CLASSES, VOC_VOID, voc_colour

from tests.interop.conftest import CLASSES


def invoke(*argv):
    result = CliRunner().invoke(cli, list(map(str, argv)))
    return result


def mask_of(images, name):
    return np.asarray(Image.open(images / f"{name}_mask.png"))


# -- Label Studio's RLE --------------------------------------------------------------------------

# Made by label_studio_sdk 2.1.2's converter.brush.encode_rle (a run of 20, of 9, a single
# value as a literal block, a run longer than 2**16, a run of 2): decoded here value for value.
SDK_VALUES = np.array([0] * 20 + [255] * 9 + [7] + [0] * 70000 + [3, 3], dtype=np.uint8)
SDK_RLE = [0, 1, 17, 144, 57, 27, 254, 19, 0, 177, 254, 0, 63, 255, 255, 0, 226, 45, 224, 16,
           129, 128]
# encode_rle([1, 2, 2, 5]) of the SDK: literal blocks ("0 00 000 value") for the single values.
SDK_LITERALS = [0, 0, 0, 4, 57, 27, 248, 0, 48, 129, 0, 10]


def test_rle_decodes_label_studio_sdk_bytes():
    assert np.array_equal(decode_rle(SDK_RLE), SDK_VALUES)
    assert decode_rle(SDK_LITERALS).tolist() == [1, 2, 2, 5]


def test_rle_encodes_runs_as_label_studio_sdk_does():
    ours = encode_rle(SDK_VALUES)
    # Byte 10 holds the single 7: the SDK writes it as a literal block, ours as a run of one.
    assert ours[:10] == SDK_RLE[:10] and ours[11:] == SDK_RLE[11:]
    assert np.array_equal(decode_rle(ours), SDK_VALUES)


@pytest.mark.parametrize("n", [0, 1, 2, 257, 65536, 65537, 140000])
def test_rle_round_trip(n):
    values = np.random.default_rng(n).integers(0, 4, n).astype(np.uint8)
    values[n // 3: n // 2] = 9
    assert np.array_equal(decode_rle(encode_rle(values)), values)
    mask = np.random.default_rng(n).random((7, 13)) < 0.5
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), 7, 13), mask)


# -- export -> import, bit for bit ----------------------------------------------------------------

@pytest.mark.parametrize("fmt, file", [("label-studio", "tasks.json"), ("coco", "coco.json")])
def test_export_then_import_gives_the_label_maps_back(tmp_path, prediction, config_file, fmt,
                                                      file, request):
    if fmt == "coco":
        request.getfixturevalue("pycocotools")
    images, pred, maps = prediction
    result = invoke("labels", "export", pred, tmp_path / "out", "--format", fmt)
    assert result.exit_code == 0, result.output
    if fmt == "label-studio":  # a labeller submits each pre-annotation unchanged
        tasks = json.loads((tmp_path / "out" / file).read_text())
        for task in tasks:
            task["annotations"] = [{"result": task["predictions"][0]["result"]}]
        (tmp_path / "out" / file).write_text(json.dumps(tasks))
    result = invoke("labels", "import", tmp_path / "out" / file, images, "--format", fmt,
                    "--config", config_file)
    assert result.exit_code == 0, result.output
    for name, labels in maps.items():
        mask = mask_of(images, name)
        assert mask.dtype == np.uint8 and np.array_equal(mask, labels), name


def test_label_studio_export_holds_scores_config_and_urls(tmp_path, prediction):
    images, pred, _ = prediction
    export_labels(pred, tmp_path / "out", "label-studio")
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d={str(images)[1:]}/img0.png"
    (p,) = tasks[0]["predictions"]
    assert p["score"] == pytest.approx(0.75)  # 1 - mean entropy / log(3)
    assert sorted(r["value"]["brushlabels"][0] for r in p["result"]) == sorted(CLASSES)
    xml = (tmp_path / "out" / "config.xml").read_text()
    assert '<BrushLabels name="tag" toName="image">' in xml
    assert xml.count("<Label value=") == 3 and 'value="cat" background="#' in xml
    export_labels(pred, tmp_path / "out2", "label-studio", url_prefix="http://x/")
    assert json.loads((tmp_path / "out2" / "tasks.json").read_text())[1]["data"]["image"] \
        == "http://x/img1.png"


def test_label_maps_at_the_model_size_are_exported_at_the_image_size(tmp_path, config_file,
                                                                     caplog):
    from tests.interop.conftest import make_prediction

    images, pred, maps = make_prediction(tmp_path, sizes=((8, 8),))
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(images / "img0.png")  # 24x16 photo
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        export_labels(pred, tmp_path / "out", "label-studio")
    assert "1 label map(s) are not at their image's size" in caplog.text
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    for task in tasks:
        task["annotations"] = [{"result": task["predictions"][0]["result"]}]
    (tmp_path / "out" / "tasks.json").write_text(json.dumps(tasks))
    import_labels(tmp_path / "out" / "tasks.json", images, "label-studio", config_file)
    expected = maps["img0"].repeat(2, axis=0).repeat(3, axis=1)  # nearest neighbour
    assert np.array_equal(mask_of(images, "img0"), expected)


def test_score_is_zero_without_uncertainty(tmp_path, pycocotools):
    from tests.interop.conftest import make_prediction

    _, pred, _ = make_prediction(tmp_path, entropy=False)
    export_labels(pred, tmp_path / "out", "coco")
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert {a["score"] for a in coco["annotations"]} == {0.0}
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert all(a["iscrowd"] == 1 and isinstance(a["segmentation"]["counts"], str)
               for a in coco["annotations"])


# -- Label Studio imports as Label Studio writes them --------------------------------------------

def ls_task(ref, regions, h=4, w=6, cancelled_first=False):
    result = [{"type": "brushlabels", "original_height": h, "original_width": w,
               "from_name": "tag", "to_name": "image",
               "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": [label]}}
              for label, m in regions]
    annotations = [{"result": result, "was_cancelled": False}]
    if cancelled_first:  # a cancelled one after it does not count
        annotations.append({"result": [], "was_cancelled": True})
    return {"id": 1, "data": {"image": ref}, "annotations": annotations}


def small_images(folder, names, h=4, w=6):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / name)
    return folder


def test_upload_names_overlaps_and_unannotated_images(tmp_path, config_file, caplog):
    data = small_images(tmp_path / "data", ["a.png", "b.jpg", "c.png"])
    left = np.zeros((4, 6), bool)
    left[:, :4] = True
    right = np.zeros((4, 6), bool)
    right[:, 2:] = True
    tasks = [ls_task("/data/upload/3/1a2b3c4d-a.png", [("cat", left), ("dog", right)],
                     cancelled_first=True),
             ls_task("http://host/data/local-files/?d=photos%2Fb.jpg", [("background", left)]),
             {"id": 3, "data": {"image": "/data/upload/3/0f0f0f0f-c.png"}, "annotations": []}]
    src = tmp_path / "export.json"
    src.write_text(json.dumps(tasks))
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        written = import_labels(src, data, "label-studio", config_file)
    assert sorted(p.name for p in written) == ["a_mask.png", "b_mask.png"]
    a = mask_of(data, "a")
    assert (a[:, :2] == 1).all() and (a[:, 2:] == 2).all()  # the later region wins
    assert (mask_of(data, "b")[:, 4:] == 255).all()  # unlabelled: the ignore label
    notes = caplog.text
    assert "1 image(s) have no annotation and were skipped: 0f0f0f0f-c.png" in notes
    assert "8 pixel(s) in 1 image(s) lie in two or more regions" in notes
    assert not (data / "c_mask.png").exists()


def test_unknown_class_is_one_line_naming_both_sides_and_nothing_is_written(tmp_path,
                                                                             config_file):
    data = small_images(tmp_path / "data", ["a.png", "b.png"])
    full = np.ones((4, 6), bool)
    src = tmp_path / "export.json"
    src.write_text(json.dumps([ls_task("a.png", [("cat", full)]),
                               ls_task("b.png", [("horse", full)])]))
    result = invoke("labels", "import", src, data, "--format", "label-studio",
                    "--config", config_file)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "'horse'" in line and "'background', 'cat', 'dog'" in line
    assert not list(data.glob("*_mask.png"))


def test_images_not_in_the_folder_and_sizes_are_checked_first(tmp_path, config_file):
    data = small_images(tmp_path / "data", ["a.png"])
    full = np.ones((4, 6), bool)
    src = tmp_path / "export.json"
    src.write_text(json.dumps([ls_task("a.png", [("cat", full)]),
                               ls_task("zzz.png", [("cat", full)])]))
    with pytest.raises(InputNotFoundError, match="1 annotated image.*zzz.png"):
        import_labels(src, data, "label-studio", config_file)
    src.write_text(json.dumps([ls_task("a.png", [("cat", np.ones((5, 6), bool))], h=5)]))
    with pytest.raises(BadInputError, match="annotated at 6x5 but .*a.png is 6x4"):
        import_labels(src, data, "label-studio", config_file)
    assert not list(data.glob("*_mask.png"))


def test_an_image_annotated_twice_is_refused(tmp_path, config_file):
    data = small_images(tmp_path / "data", ["a.png"])
    full = np.ones((4, 6), bool)
    src = tmp_path / "export.json"
    src.write_text(json.dumps([ls_task("a.png", [("cat", full)]),
                               ls_task("/data/upload/1/12345678-a.png", [("dog", full)])]))
    with pytest.raises(BadInputError, match="a.png is annotated twice"):
        import_labels(src, data, "label-studio", config_file)
    assert not (data / "a_mask.png").exists()


def test_a_mask_extract_would_read_first_is_refused(tmp_path, config_file):
    data = small_images(tmp_path / "data", ["a.png"])
    np.save(data / "a.npy", np.zeros((4, 6), np.uint8))
    src = tmp_path / "export.json"
    src.write_text(json.dumps([ls_task("a.png", [("cat", np.ones((4, 6), bool))])]))
    with pytest.raises(BadInputError, match="a.png already has the mask a.npy"):
        import_labels(src, data, "label-studio", config_file)
    assert not (data / "a_mask.png").exists()


# -- COCO polygons -------------------------------------------------------------------------------

def test_coco_polygons_and_uncompressed_rle(tmp_path, config_file, pycocotools):
    data = small_images(tmp_path / "data", ["x.png"], h=10, w=10)
    coco = {"images": [{"id": 7, "file_name": "some/dir/x.png", "height": 10, "width": 10}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
                {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 1,
                 "segmentation": {"size": [10, 10], "counts": [90, 10]}}]}
    src = tmp_path / "coco.json"
    src.write_text(json.dumps(coco))
    import_labels(src, data, "coco", config_file)
    mask = mask_of(data, "x")
    assert (mask[1:4, 1:4] == 1).all() and (mask[:, 9] == 2).all() and mask[8, 7] == 255


# -- CVAT "Segmentation mask 1.1" and VOC --------------------------------------------------------

def test_cvat_segmentation_mask_export(tmp_path, config_file):
    data = small_images(tmp_path / "data", ["p.jpg", "q.png"], h=4, w=6)
    src = tmp_path / "cvat"
    (src / "SegmentationClass").mkdir(parents=True)
    (src / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
                                      "cat:250,50,83::\ndog:61,61,245::\n")
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:2, :3] = (250, 50, 83)
    rgb[3, :] = (61, 61, 245)
    Image.fromarray(rgb).save(src / "SegmentationClass" / "p.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(src / "SegmentationClass" / "q.png")
    result = invoke("labels", "import", src, data, "--format", "cvat", "--config", config_file)
    assert result.exit_code == 0, result.output
    expected = np.zeros((4, 6), np.uint8)
    expected[:2, :3] = 1
    expected[3] = 2
    assert np.array_equal(mask_of(data, "p"), expected)
    assert np.array_equal(mask_of(data, "q"), np.zeros((4, 6), np.uint8))
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(src / "SegmentationClass" / "p.png")
    with pytest.raises(BadInputError, match=r"colour\(s\) no label names: \(1, 2, 3\)"):
        import_labels(src, data, "cvat", config_file)


def test_voc_palette_pngs_without_labelmap(tmp_path):
    config = tmp_path / "voc.toml"
    config.write_text(f"[data]\nnum_classes = 21\nclass_names = {json.dumps(VOC_CLASSES)}\n")
    data = small_images(tmp_path / "data", ["v.jpg"], h=3, w=3)
    index = np.array([[0, 8, 8], [12, 255, 0], [15, 15, 15]], np.uint8)
    png = Image.fromarray(index, mode="P")
    palette = [v for i in range(256) for v in (VOC_VOID if i == 255 else voc_colour(i))]
    png.putpalette(palette)
    (tmp_path / "voc" / "SegmentationClass").mkdir(parents=True)
    png.save(tmp_path / "voc" / "SegmentationClass" / "v.png")
    assert voc_colour(15) == (192, 128, 128)  # person, as VOC draws it
    import_labels(tmp_path / "voc", data, "voc", config)
    assert mask_of(data, "v").tolist() == index.tolist()  # void stays the ignore label 255


# -- the optional extra --------------------------------------------------------------------------

def test_missing_pycocotools_names_the_extra(tmp_path, prediction, monkeypatch):
    _, pred, _ = prediction
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(InputNotFoundError, match=r"pip install 'ddpmseg\[labels\]'"):
        export_labels(pred, tmp_path / "out", "coco")


def test_cli_import_is_light():
    import subprocess

    code = ("import sys; from ddpmseg.cli import labels; "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""README's "Labelling in a tool" block, run as written (the bundled backbone substituted for
lsun_horse.pt, as the labelling loop's test does), with the Label Studio step played by a
labeller who repaints a block of each pre-annotation and submits it."""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ddpmseg.interop.labels.label_studio import mask_to_rle, rle_to_mask
from tests.test_readme import (LOOP, bash_blocks, commands, make_data, run, section,
                               substituted)

TOOL = "### Labelling in a tool"
SUBSTITUTIONS = [
    ("--checkpoint lsun_horse.pt", "--checkpoint bundled:faces_64 --resize"),
    ("preds/ --uncertainty", "preds/ --uncertainty --resize"),
    ("ddpmseg fit train.zarr runs/horse-2 --config configs/horse_21.toml",
     "ddpmseg fit train.zarr runs/horse-2 --config configs/horse_21.toml --ensemble 2 "
     "--max-epochs 1"),
]
REPO = Path(__file__).resolve().parents[2]


def label_in_label_studio(tasks_file: Path, export_file: Path) -> dict[str, np.ndarray]:
    """The labeller: each pre-annotation with a block repainted as "head", submitted;
    the project exported. Returns the submitted masks by image file name."""
    tasks = json.loads(tasks_file.read_text())
    submitted = {}
    for task in tasks:
        regions = task["predictions"][0]["result"]
        h, w = regions[0]["original_height"], regions[0]["original_width"]
        classes = [r["value"]["brushlabels"][0] for r in regions]
        labels = np.zeros((h, w), np.uint8)  # index into classes
        for i, r in enumerate(regions):
            labels[rle_to_mask(r["value"]["rle"], h, w)] = i
        if "head" not in classes:
            classes.append("head")
        labels[h // 4: h // 2, w // 4: w // 2] = classes.index("head")
        task["annotations"] = [{"result": [
            {**regions[0], "value": {"format": "rle", "rle": mask_to_rle(labels == i),
                                     "brushlabels": [name]}}
            for i, name in enumerate(classes) if (labels == i).any()]}]
        submitted[task["data"]["image"].rsplit("/", 1)[1]] = labels, classes
    export_file.write_text(json.dumps(tasks))
    return submitted


def test_labelling_in_a_tool_block(tmp_path, monkeypatch, capsys, one_thread):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = section(LOOP).split(TOOL, 1)[1]
    (block,) = bash_blocks(text)[:1]
    block = substituted(block, SUBSTITUTIONS, "SUBSTITUTIONS", capsys,
                        "labelling-in-a-tool block run with the bundled faces_64 backbone "
                        "substituted for lsun_horse.pt")
    run("ddpmseg extract data/train train.zarr --config configs/horse_21.toml "
        "--checkpoint bundled:faces_64 --resize")
    run("ddpmseg fit train.zarr runs/horse-1 --config configs/horse_21.toml --ensemble 2 "
        "--max-epochs 1")
    Path("data/unlabelled").mkdir()
    for png in sorted(Path("data/test").glob("*.png")):
        shutil.copy(png, "data/unlabelled")
    first, rest = block.split("# in Label Studio", 1)
    for command in commands(first):
        run(command)
    submitted = label_in_label_studio(Path("labelstudio/tasks.json"), Path("export.json"))
    imported, rest = rest.split("# move the labelled images", 1)
    for command in commands(imported):
        run(command)
    from ddpmseg.config import load_toml

    names = load_toml("configs/horse_21.toml").data.class_names
    for file_name, (labels, classes) in submitted.items():
        stem = Path(file_name).stem
        mask = np.asarray(Image.open(f"data/unlabelled/{stem}_mask.png"))
        expected = np.array([names.index(c) for c in classes], np.uint8)[labels]
        assert np.array_equal(mask, expected), stem
        for path in Path("data/unlabelled").glob(f"{stem}*"):
            shutil.move(path, "data/train")
    for command in commands(rest):
        run(command)
    from ddpmseg.featcache import FeatureStore

    assert len(FeatureStore.open("train.zarr")) == 4  # grown by the two labelled images
    assert Path("runs/horse-2/store.json").is_file()

"""A small prediction folder, as `ddpmseg predict --uncertainty` writes it, with ground truth
and originals, whose per-image IoU, uncertainty and class IoU are known; names that need
HTML escaping on purpose."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmseg.outputs import render

CLASS_NAMES = ("background", "<script>alert(1)</script>", "cat & dog", 'say "hi"')
SIZE = (16, 20)


@dataclass
class PredFolder:
    pred: Path
    gt: Path
    images: Path
    names: tuple          # image names, in file order
    iou_order: tuple      # worst image IoU first
    entropy_order: tuple  # most uncertain (mean entropy) first
    jsd_order: tuple      # highest mean JSD first
    num_classes: int


def _gt() -> np.ndarray:
    gt = np.zeros(SIZE, np.uint8)
    gt[:, 5:10] = 1
    gt[:, 10:15] = 2
    gt[:, 15:] = 3
    return gt


@pytest.fixture
def pred_folder(tmp_path) -> PredFolder:
    pred, gt_dir, images = tmp_path / "pred", tmp_path / "gt", tmp_path / "images"
    for d in (pred, gt_dir, images):
        d.mkdir()
    names = ("<i>", "plain", "q&a")
    wrong_columns = {"<i>": 9, "plain": 0, "q&a": 3}  # columns predicted as class 0
    means = {"<i>": (0.2, 0.05), "plain": (0.9, 0.01), "q&a": (0.5, 0.30)}
    rng = np.random.default_rng(0)
    for name in names:
        gt = _gt()
        labels = gt.copy()
        labels[:, 20 - wrong_columns[name]:] = 0
        np.save(gt_dir / f"{name}.npy", gt)
        np.save(pred / f"{name}.npy", labels)
        render.save_label_png(pred / f"{name}.png", labels, render.make_palette(4, 255))
        ent, jsd = means[name]
        np.save(pred / f"{name}_entropy.npy", np.full(SIZE, ent, np.float32))
        np.save(pred / f"{name}_jsd.npy", np.full(SIZE, jsd, np.float32))
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3)).astype(np.uint8)).save(
            images / f"{name}.png")
    meta = {
        "version": "test", "input": str(tmp_path / "store.zarr"), "input_kind": "store",
        "vote": "soft", "uncertainty": True, "images": str(images), "num_members": 3,
        "num_classes": 4, "ignore_label": 255, "class_names": list(CLASS_NAMES),
        "steps": [50, 150], "blocks": [5, 6], "image_size": list(SIZE),
        "fingerprint": {"sha256": "ab" * 32, "flags": {"image_size": 20, "note": "<b>x</b>"}},
        "config": {"model": {"preset": "faces_64", "checkpoint": "<ckpt>.pt"},
                   "classifier": {"etf": "shared", "etf_weight": 0.4}},
        "num_images": 3, "names": list(names),
    }
    (pred / "predict.json").write_text(json.dumps(meta))
    return PredFolder(pred, gt_dir, images, names, iou_order=("<i>", "q&a", "plain"),
                      entropy_order=("plain", "q&a", "<i>"), jsd_order=("q&a", "<i>", "plain"),
                      num_classes=4)

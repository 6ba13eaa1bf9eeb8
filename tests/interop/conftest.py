"""A hand-made prediction folder (what `predict` leaves) and its images, for labels tests."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import need

CLASSES = ("background", "cat", "dog")
CONFIG_TOML = ('[data]\nnum_classes = 3\nignore_label = 255\n'
               'class_names = ["background", "cat", "dog"]\n')


def label_map(rng, h: int, w: int) -> np.ndarray:
    """Blocks of the three classes and some single pixels: runs of every length."""
    labels = np.zeros((h, w), np.uint8)
    labels[h // 4: h // 2, w // 5: w // 2] = 1
    labels[h // 2:, w // 2:] = 2
    noise = rng.random((h, w)) < 0.05
    labels[noise] = rng.integers(0, 3, int(noise.sum()))
    return labels


def make_prediction(root: Path, sizes=((40, 60), (48, 32)), entropy: bool = True):
    """root/images/img<i>.png and root/pred: predict.json, <name>.npy, <name>_entropy.npy."""
    rng = np.random.default_rng(0)
    images, pred = root / "images", root / "pred"
    images.mkdir(parents=True)
    pred.mkdir()
    names, maps = [], {}
    for i, (h, w) in enumerate(sizes):
        name = f"img{i}"
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.png")
        maps[name] = label_map(rng, h, w)
        np.save(pred / f"{name}.npy", maps[name])
        if entropy:
            np.save(pred / f"{name}_entropy.npy", np.full((h, w), 0.25 * np.log(3), np.float32))
            np.save(pred / f"{name}_jsd.npy", np.zeros((h, w), np.float32))
        names.append(name)
    meta = {"names": names, "num_classes": 3, "ignore_label": 255, "class_names": list(CLASSES),
            "input": str(images), "input_kind": "images", "images": None,
            "uncertainty": entropy}
    (pred / "predict.json").write_text(json.dumps(meta))
    return images, pred, maps


@pytest.fixture
def prediction(tmp_path):
    return make_prediction(tmp_path)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "classes.toml"
    path.write_text(CONFIG_TOML)
    return path


@pytest.fixture
def pycocotools():
    """COCO's encodings (the [labels] extra): without them skip, except under CI=true."""
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        need("pycocotools is not installed: pip install -e '.[labels]'")

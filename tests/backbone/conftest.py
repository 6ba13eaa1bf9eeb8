"""Where the shared fixtures live: ../shared beside the repository root (not part of the repo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import pytest

@pytest.fixture(scope="session")
def adm_dir(fixtures_dir: Path) -> Path:
    """The ADM parity fixtures (tests/conftest.py's fixtures_dir)."""
    return fixtures_dir


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        # Smooth colour gradients (learnable) of assorted sizes, so centre-cropping is exercised.
        h, w = 16 + 3 * i, 20 + i
        yy, xx = np.mgrid[0:h, 0:w]
        col = rng.integers(0, 255, 3)
        img = (col[None, None] * (0.3 + 0.7 * (xx / w))[..., None]).astype(np.uint8)
        img[..., i % 3] = (yy * 255 // h).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder

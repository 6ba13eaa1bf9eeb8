"""Training data of a backbone run: images held in RAM as uint8, and the resumable data order."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from ddpmseg.data import list_samples, load_image
from ddpmseg.core.errors import BadInputError, RunError
from ddpmseg.core.progress import bar


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): shorter side resized to ``size``, centre cropped."""
    im = Image.fromarray(image)
    w, h = im.size
    # Halve with a box filter first while far larger, then bicubic: guided-diffusion's way.
    while min(w, h) >= 2 * size:
        im = im.resize((w // 2, h // 2), Image.BOX)
        w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size].copy()


def load_images(images_dir: str | Path, size: int, progress: bool = False) -> torch.Tensor:
    """All images of ``images_dir`` as one uint8 tensor (N, 3, size, size), sorted by name."""
    samples = list_samples(images_dir)
    out = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    for i, s in enumerate(bar(samples, total=len(samples), desc="loading images", unit="img",
                              progress=progress, leave=False)):
        arr = load_image(s.image)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) == 0:
            raise BadInputError(f"cannot use image {s.image} (shape {arr.shape})",
                                "replace or remove the file")
        out[i] = torch.from_numpy(center_crop(arr, size)).permute(2, 0, 1)
    return out


class DataOrder:
    """Epochs of random permutations from the run's generator, with a resumable position."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.gen = generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0
        self.epoch = 0

    def next(self, batch: int) -> torch.Tensor:
        """The indices of the next ``batch`` images, running into the next epoch as needed."""
        parts, need = [], batch
        while need > 0:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load(self, st: Mapping) -> None:
        if int(st["perm"].numel()) != self.n:
            raise RunError(f"the run was trained on {int(st['perm'].numel())} images but the "
                           f"folder now holds {self.n}",
                           "resume with the same images, or start a new output folder")
        self.perm = st["perm"].clone()
        self.pos = int(st["pos"])
        self.epoch = int(st["epoch"])

"""What the rest of ddpmseg needs from a diffusion model, whatever its kind.

A backbone noises images to a few steps t, runs its denoiser and returns what some decoder
blocks output. The store, fit and predict only use this interface, so they never know whether
the maps came from an ADM UNet, a diffusers ``UNet2DModel`` or Stable Diffusion.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterable, Sequence

import numpy as np
import torch

from ddpmseg.core.errors import BadInputError, ConfigError
from ddpmseg.spec import BlockId

def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], as the reference normalises.

    Contiguous: a permuted (channels-last) tensor sends the convolutions down another kernel
    whose results differ in the last float bits, so features would depend on how x0 was made.
    """
    return torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div(127.5).sub(1.0)


# The autocast dtype of each of spec.PRECISIONS (None: no autocast).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(device: torch.device, precision: str):
    """torch.autocast for "bf16"/"fp16" (fp16 on CUDA only), nothing for "fp32"."""
    if precision not in AUTOCAST:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(AUTOCAST)}")
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device", "use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def check_image(x0, device: torch.device, factor: int, what: str) -> torch.Tensor:
    """x0 as float32 (B, 3, H, W) in [-1, 1] on ``device``, H and W multiples of ``factor``."""
    if not isinstance(x0, torch.Tensor):
        raise BadInputError(f"x0 must be a torch tensor, got {type(x0).__name__}")
    if x0.dim() != 4 or x0.shape[1] != 3 or x0.shape[0] == 0:
        raise BadInputError(f"x0 must be (B, 3, H, W) with B >= 1, got {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise BadInputError(f"x0 must be a float tensor in [-1, 1], got {x0.dtype}",
                            "scale 8-bit images as x / 127.5 - 1")
    if x0.shape[2] % factor or x0.shape[3] % factor:
        raise BadInputError(f"image size {tuple(x0.shape[2:])} is not a multiple of {factor}, "
                            f"which {what} needs")
    x0 = x0.to(device, torch.float32)
    lo, hi = x0.aminmax()
    # A little slack for rounding in the caller's normalisation.
    if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < -1.001 or hi > 1.001:
        raise BadInputError(f"x0 must be in [-1, 1], got values in "
                            f"[{float(lo):.4g}, {float(hi):.4g}]",
                            "scale 8-bit images as x / 127.5 - 1")
    return x0


def seeded_noise(shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (so every device gets the same), then moved."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=gen).to(device)


def check_noise(noise, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``noise`` as a float32 tensor of exactly ``shape`` (a missing batch axis is added)."""
    if not isinstance(noise, torch.Tensor):
        raise BadInputError(f"noise must be a torch tensor, got {type(noise).__name__}")
    if noise.dim() == len(shape) - 1:
        noise = noise[None]
    if tuple(noise.shape) != tuple(shape):
        raise BadInputError(f"noise must be {tuple(shape)} and is shared by every image and "
                            f"step, got {tuple(noise.shape)}")
    return noise.to(device, torch.float32)


def check_steps(steps: Iterable, upper: int) -> list[int]:
    out = []
    for v in steps:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < upper:
            raise ConfigError(f"step {v!r} is out of range 0..{upper - 1}")
        out.append(int(v))
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"steps must be a non-empty list without repeats, got {out}")
    return out


class FeatureBackbone(abc.ABC):
    """The interface: noise at steps, activations of named decoder blocks, fingerprint, size.

    Attributes every backbone has: ``kind`` ("adm", "diffusers-unet", "stable-diffusion"),
    ``device``, ``sha256`` (what identifies its weights).
    """

    kind: str = ""
    device: torch.device
    sha256: str = ""

    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """The (square) image size the model was trained at, in pixels."""

    @property
    @abc.abstractmethod
    def num_steps(self) -> int:
        """How many diffusion steps its schedule has (valid steps are 0..num_steps-1)."""

    @abc.abstractmethod
    def block_shapes(self, blocks: Iterable[BlockId] | None = None
                     ) -> dict[BlockId, tuple[int, int, int]]:
        """{block: (C, h, w)} of each block's output for an image_size input."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """What identifies this backbone's features (JSON-able); stores and runs keep it."""

    @abc.abstractmethod
    def default_noise(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """The noise shared by every image and step of an (height, width) batch."""

    def parameter_count(self) -> int:
        """Parameters of the modules that compute the features."""
        return sum(p.numel() for p in self.model.parameters())

    @abc.abstractmethod
    def activations(self, x0: torch.Tensor, steps: Sequence[int], blocks: Sequence[BlockId],
                    noise: torch.Tensor | None = None, seed: int = 0, *,
                    max_batch: int | None = None, precision: str = "fp32"
                    ) -> dict[tuple[int, BlockId], torch.Tensor]:
        """{(t, block): float32 (B, C, h, w)}, step-major then block as given, for images
        x0 (B, 3, H, W) in [-1, 1] noised to each step t with ``noise`` (or seeded noise)."""

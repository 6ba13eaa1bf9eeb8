"""What the rest of ddpmseg needs from a diffusion model, whatever its kind.

A backbone noises images to a few steps t, runs its denoiser and returns what some decoder
blocks output. The store, fit and predict only use this interface, so they never know whether
the maps came from an ADM UNet, a diffusers ``UNet2DModel`` or Stable Diffusion.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ddpmseg.core import device as core_device
from ddpmseg.core.errors import BadInputError, ConfigError
from ddpmseg.spec import BackboneId, BlockId, check_steps

def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], as the reference normalises.

    Contiguous: a permuted (channels-last) tensor sends the convolutions down another kernel
    whose results differ in the last float bits, so features would depend on how x0 was made.
    """
    return torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div(127.5).sub(1.0)


log = logging.getLogger(__name__)

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
    if dtype is torch.bfloat16 and device.type == "cpu":
        note_emulated_bf16()
    return torch.autocast(device.type, dtype=dtype)


@functools.lru_cache(maxsize=None)
def note_emulated_bf16() -> bool:
    """Say once per process when bf16 on this CPU is emulated (no AMX-BF16 / AVX512-BF16):
    there its convolutions are 50-100x slower than float32 (bench/results/precision.json).
    Returns whether it did."""
    if core_device.cpu_bf16_native():
        return False
    log.warning("precision bf16 on this CPU is emulated (no AMX-BF16 or AVX512-BF16): far "
                "slower than fp32; pass `precision=\"fp32\"`")
    return True


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


@contextlib.contextmanager
def seeded_init(seed: int):
    """For building modules whose default initialisation draws from torch's global CPU
    generator: inside, that generator is seeded with ``seed``; after, the caller's state is
    back (and no CUDA generator was touched, as ``torch.manual_seed`` would)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


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


def check_max_batch(max_batch) -> int | None:
    """None (everything in one forward) or a positive int."""
    if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    return None if max_batch is None else int(max_batch)


@dataclass(frozen=True)
class Job:
    """A checked ``activations`` call: images, steps, blocks, shared noise, chunk size,
    autocast context."""

    x0: torch.Tensor
    steps: tuple[int, ...]
    blocks: tuple[BlockId, ...]
    noise: torch.Tensor
    max_batch: int | None
    autocast: object


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

    @property
    @abc.abstractmethod
    def ident(self) -> BackboneId:
        """What identifies this backbone's features: its kind, weights' sha256 and flags."""

    def fingerprint(self) -> dict:
        """``ident`` as JSON; stores and runs keep it."""
        return self.ident.to_json()

    def default_noise(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """The noise shared by every image and step of an (height, width) batch: standard
        normal, drawn on the CPU so every device gets the same."""
        return seeded_noise(self._noise_shape(height, width), seed, self.device)

    def parameter_count(self) -> int:
        """Parameters of the modules that compute the features."""
        return sum(p.numel() for p in self.model.parameters())

    # -- what each kind says for the checks of ``activations`` ------------------------------
    @abc.abstractmethod
    def _noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        """(1, C, h, w) of the noise for (height, width) images."""

    @abc.abstractmethod
    def _check_blocks(self, blocks) -> tuple[BlockId, ...]:
        """``blocks`` checked against this model (ConfigError naming what is wrong)."""

    @abc.abstractmethod
    def _check_image(self, x0) -> torch.Tensor:
        """``check_image`` with this model's size factor."""

    def _job(self, x0, steps, blocks, noise, seed: int, max_batch, precision: str) -> Job:
        """Every argument of ``activations`` checked, the noise drawn when None."""
        steps = check_steps(steps, self.num_steps)
        blocks = self._check_blocks(blocks)
        max_batch = check_max_batch(max_batch)
        autocast = precision_context(self.device, precision)
        x0 = self._check_image(x0)
        shape = self._noise_shape(x0.shape[2], x0.shape[3])
        noise = seeded_noise(shape, seed, self.device) if noise is None else \
            check_noise(noise, shape, self.device)
        return Job(x0, steps, blocks, noise, max_batch, autocast)

    def _gather(self, job: Job,
                run: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]
                ) -> dict[tuple[int, BlockId], torch.Tensor]:
        """The batching loop every backbone shares: the B x len(steps) (image, step) pairs,
        image major (an image's steps sit together, so a chunk holds whole images where it
        can), in chunks of ``job.max_batch``; ``run(imgs, t)`` (CPU long tensors: image index
        and step of each pair) gives each block's output for the chunk, in ``job.blocks``
        order, scattered here into {(t, block): float32 (B, C, h, w)} on ``self.device``,
        step-major then block."""
        n_img, steps, blocks = job.x0.shape[0], job.steps, job.blocks
        total = n_img * len(steps)
        chunk = total if job.max_batch is None else job.max_batch
        img_idx = torch.arange(n_img).repeat_interleave(len(steps))
        step_idx = torch.arange(len(steps)).repeat(n_img)
        step_values = torch.tensor(steps, dtype=torch.long)
        out: dict[tuple[int, BlockId], torch.Tensor] = {}
        for start in range(0, total, chunk):
            imgs, pos = img_idx[start:start + chunk], step_idx[start:start + chunk]
            feats = run(imgs, step_values[pos])
            if not out:
                for s in steps:
                    for k, b in enumerate(blocks):
                        out[(s, b)] = torch.empty((n_img,) + tuple(feats[k].shape[1:]),
                                                  dtype=torch.float32, device=self.device)
            for r, (i, j) in enumerate(zip(imgs.tolist(), pos.tolist())):
                for k, b in enumerate(blocks):
                    out[(steps[j], b)][i] = feats[k][r]
        return out

    @abc.abstractmethod
    def activations(self, x0: torch.Tensor, steps: Sequence[int], blocks: Sequence[BlockId],
                    noise: torch.Tensor | None = None, seed: int = 0, *,
                    max_batch: int | None = None, precision: str = "fp32"
                    ) -> dict[tuple[int, BlockId], torch.Tensor]:
        """{(t, block): float32 (B, C, h, w)}, step-major then block as given, for images
        x0 (B, 3, H, W) in [-1, 1] noised to each step t with ``noise`` (or seeded noise)."""

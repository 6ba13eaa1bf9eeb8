"""``Backbone``: a loaded ADM UNet that turns images into decoder activations.

This is the only thing the rest of ddpmseg needs from a diffusion model: noise an image to a few
steps t, run the UNet, and read what some decoder blocks output.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from ddpmseg.core.device import resolve_device
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.core.errors import BadInputError, CheckpointError, ConfigError, InputNotFoundError
from ddpmseg.core.fileio import sha256_file
from ddpmseg.backbone.base import (
    FeatureBackbone,
    check_image,
    check_noise,
    precision_context,
    seeded_noise,
)
from ddpmseg.backbone.adm.checkpoint import check_state_dict, load_checkpoint, load_state_dict
from ddpmseg.backbone.diffusion import Schedule
from ddpmseg.spec import BackboneId
from ddpmseg.backbone.adm.flags import PRESETS, USUAL_FEATURES, ModelFlags
from ddpmseg.backbone.adm.unet import UNetModel

# The paper's choice for the 256px LSUN/FFHQ models (8448 dims per pixel).
DEFAULT_STEPS = (50, 150, 250)
DEFAULT_BLOCKS = (5, 6, 7, 8, 12)


def _int_list(name: str, values: Iterable, upper: int) -> list[int]:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.reshape(-1).tolist()
    elif isinstance(values, numbers.Integral):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"{name} must be integers, got {v!r}")
        if not 0 <= int(v) < upper:
            raise ConfigError(f"{name[:-1]} {v} is out of range: this model's {name} are "
                              f"0..{upper - 1}", _range_hint(name, upper))
        out.append(int(v))
    if not out:
        raise ConfigError(f"no {name} given")
    if len(set(out)) != len(out):
        raise ConfigError(f"{name} repeat a value: {out}")
    return out


def presets_that_fit(path: str | Path, skip: ModelFlags | None = None) -> list[str]:
    """The preset names whose architecture loads ``path`` strictly (keys and shapes)."""
    sd = load_state_dict(path)
    fits = []
    for name, flags in PRESETS.items():
        if flags == skip:
            continue
        with torch.device("meta"):
            model = UNetModel.from_flags(flags)
        try:
            check_state_dict(model, sd)
        except CheckpointError:
            continue
        fits.append(name)
    return fits


def _range_hint(name: str, upper: int) -> str:
    if name != "blocks":
        return f"pass --{name} with values in 0..{upper - 1}"
    # Name the presets whose usual blocks fit, so a user need not guess.
    fitting = [f"{p}: {','.join(map(str, f['blocks']))}" for p, f in USUAL_FEATURES.items()
               if max(f["blocks"]) < upper]
    usual = f" (usual choices: {'; '.join(fitting)})" if fitting else ""
    return f"pass --blocks with values in 0..{upper - 1}{usual}"


class Backbone(FeatureBackbone):
    """An ADM UNet in eval mode on one device, with its flags, schedule and checkpoint hash.

    Build it with ``from_checkpoint`` (or ``random`` for benchmarks); the constructor takes a
    ready model, for tests.
    """

    kind = "adm"

    def __init__(self, model: UNetModel, flags: ModelFlags | Mapping | str | Path,
                 sha256: str = "", device: str | torch.device | None = None):
        self.flags = ModelFlags.resolve(flags)
        if device is None:
            device = next(model.parameters()).device
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.sha256 = sha256
        self.schedule = Schedule.from_flags(self.flags)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, flags: ModelFlags | Mapping | str | Path,
                        device: str | torch.device = "cpu") -> "Backbone":
        """Load a guided-diffusion checkpoint strictly into the model ``flags`` describe.

        ``path``: a file, or ``bundled:faces_64`` for the small face model that ships inside
        ddpmseg. ``flags``: ModelFlags, a guided-diffusion flag dict, a preset name or a JSON path.
        Raises InputNotFoundError for a missing file and CheckpointError when keys or shapes
        do not match (naming them and the flags most likely wrong).
        """
        preset = flags if isinstance(flags, str) and flags in PRESETS else None
        flags = ModelFlags.resolve(flags)
        device = resolve_device(device)
        path = resolve_checkpoint(path).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"checkpoint {path} does not exist",
                                     "check the path to the .pt file")
        digest = sha256_file(path)
        # Built on the meta device: loading then assigns the checkpoint's tensors, so no time
        # or memory goes into random weights that would be overwritten at once.
        with torch.device("meta"):
            model = UNetModel.from_flags(flags)
        try:
            load_checkpoint(model, path)
        except CheckpointError as exc:
            # A wrong preset name: the key-by-key diagnosis helps nobody when another preset
            # simply fits (hand-written flags keep it: it says which flag is off).
            fits = presets_that_fit(path, skip=flags) if preset else []
            if not fits:
                raise
            counts = re.findall(r"(\d+ (?:missing keys|unexpected keys|shape mismatches))",
                                exc.message)
            raise CheckpointError(f"{path} does not fit preset {preset} "
                                  f"({', '.join(counts)})",
                                  f"it loads as preset {' / '.join(fits)}: pass --preset "
                                  f"{fits[0]}") from exc
        return cls(model, flags, sha256=digest, device=device)

    @classmethod
    def random(cls, flags: ModelFlags | Mapping | str | Path, seed: int = 0,
               device: str | torch.device = "cpu") -> "Backbone":
        """A randomly initialised model (PyTorch's default init, seeded), for benchmarks."""
        flags = ModelFlags.resolve(flags)
        # fork_rng: seeding must not disturb the caller's global random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UNetModel.from_flags(flags)
        return cls(model, flags, sha256=BackboneId.random(seed).sha256, device=device)

    # -- description ------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.flags.image_size

    @property
    def num_steps(self) -> int:
        return self.flags.diffusion_steps

    @property
    def num_blocks(self) -> int:
        """How many decoder blocks (output_blocks) the model has."""
        return len(self.model.output_blocks)

    def block_shapes(self, blocks: Iterable[int] | None = None) -> dict[int, tuple[int, int, int]]:
        """{b: (C, h, w)} of decoder block b's output for an image_size input (all when None)."""
        blocks = range(self.num_blocks) if blocks is None else \
            _int_list("blocks", blocks, self.num_blocks)
        size = self.flags.image_size
        return {b: (self.model.decoder_shapes[b][0], size // self.model.decoder_shapes[b][1],
                    size // self.model.decoder_shapes[b][1]) for b in blocks}

    def fingerprint(self) -> dict:
        """What identifies this backbone's features: checkpoint hash and flags (JSON-able)."""
        return self.ident.to_json()

    @property
    def ident(self) -> BackboneId:
        return BackboneId(self.sha256, self.flags.to_dict())

    def __repr__(self) -> str:
        return (f"Backbone(image_size={self.flags.image_size}, "
                f"num_channels={self.flags.num_channels}, device={self.device}, "
                f"sha256={self.sha256[:12]!r})")

    # -- extraction -------------------------------------------------------------------------

    def default_noise(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """(1, 3, H, W) standard normal noise, drawn on the CPU so every device gets the same."""
        return seeded_noise((1, 3, height, width), seed, self.device)

    def _check_image(self, x0: torch.Tensor) -> torch.Tensor:
        levels = len(self.flags.mult)
        return check_image(x0, self.device, 2 ** (levels - 1), f"this UNet's {levels} levels")

    def _check_noise(self, noise: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return check_noise(noise, (1, 3, shape[2], shape[3]), self.device)

    def _autocast(self, precision: str):
        return precision_context(self.device, precision)

    def activations(self, x0: torch.Tensor, steps: Sequence[int], blocks: Sequence[int],
                    noise: torch.Tensor | None = None, seed: int = 0, *,
                    max_batch: int | None = None, precision: str = "fp32",
                    y: torch.Tensor | None = None) -> dict[tuple[int, int], torch.Tensor]:
        """Decoder activations of images noised to each step.

        x0: (B, 3, H, W) float in [-1, 1]. ``noise``: one (1, 3, H, W) tensor shared by every
        image and step; when None, ``torch.randn(1, 3, H, W)`` from a CPU generator seeded with
        ``seed``. Returns {(t, b): float32 (B, C_b, h_b, w_b)} ordered step-major, then block as
        given, kept on the backbone's device (callers move them when and if they need to).

        All B * len(steps) noised images run as one batch (at most ``max_batch`` per forward
        when given), and the UNet stops after the deepest requested decoder block.
        ``precision`` "bf16"/"fp16" runs under torch.autocast (fp16 on CUDA only); outputs are
        float32 either way. ``y``: (B,) class labels, only for class_cond models.
        """
        steps = _int_list("steps", steps, self.flags.diffusion_steps)
        blocks = _int_list("blocks", blocks, self.num_blocks)
        autocast = self._autocast(precision)
        x0 = self._check_image(x0)
        if noise is None:
            noise = self.default_noise(x0.shape[2], x0.shape[3], seed)
        else:
            noise = self._check_noise(noise, x0.shape)
        if (y is None) != (self.flags.num_classes is None):
            raise ConfigError("class labels y are needed for class_cond models and only for them")
        if y is not None:
            y = torch.as_tensor(y, dtype=torch.long, device=self.device).reshape(-1)
            if y.shape[0] != x0.shape[0]:
                raise BadInputError(f"y has {y.shape[0]} labels for {x0.shape[0]} images")
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")

        n_img, n_steps = x0.shape[0], len(steps)
        total = n_img * n_steps
        chunk = total if max_batch is None else int(max_batch)
        # Image-major order: an image's steps sit together, so a chunk holds whole images.
        img_idx = torch.arange(n_img, device=self.device).repeat_interleave(n_steps)
        step_idx = torch.arange(n_steps, device=self.device).repeat(n_img)
        step_values = torch.tensor(steps, dtype=torch.long, device=self.device)
        out: dict[tuple[int, int], torch.Tensor] = {}

        with torch.inference_mode(), autocast:
            for start in range(0, total, chunk):
                imgs = img_idx[start:start + chunk]
                pos = step_idx[start:start + chunk]
                t = step_values[pos]
                x_t = self.schedule.q_sample(x0[imgs], t, noise)
                feats = self.model.decoder_features(
                    x_t, self.schedule.model_timesteps(t), blocks,
                    y=None if y is None else y[imgs])
                if not out:
                    for s in steps:
                        for b in blocks:
                            shape = (n_img,) + tuple(feats[b].shape[1:])
                            out[(s, b)] = torch.empty(shape, dtype=torch.float32,
                                                      device=self.device)
                for k, (i, j) in enumerate(zip(imgs.tolist(), pos.tolist())):
                    for b in blocks:
                        out[(steps[j], b)][i] = feats[b][k]
        return out

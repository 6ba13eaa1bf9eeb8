"""``Backbone``: a loaded ADM UNet that turns images into decoder activations.

This is the only thing the rest of ddpmseg needs from a diffusion model: noise an image to a few
steps t, run the UNet, and read what some decoder blocks output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ddpmseg.core.device import resolve_device
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.core.errors import BadInputError, CheckpointError, ConfigError, InputNotFoundError
from ddpmseg.core.fileio import sha256_file
from ddpmseg.backbone.base import FeatureBackbone, check_image, seeded_init
from ddpmseg.backbone.adm.checkpoint import check_state_dict, load_checkpoint, load_state_dict
from ddpmseg.backbone.diffusion import Schedule
from ddpmseg.spec import BackboneId, check_blocks
from ddpmseg.backbone.adm.flags import PRESETS, USUAL_FEATURES, ModelFlags
from ddpmseg.backbone.adm.unet import UNetModel

# The paper's choice for the 256px LSUN/FFHQ models (8448 dims per pixel).
DEFAULT_STEPS = (50, 150, 250)
DEFAULT_BLOCKS = (5, 6, 7, 8, 12)


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


def blocks_hint(num_blocks: int) -> str:
    """The presets' usual blocks that fit a decoder of ``num_blocks``, so a user need not
    guess."""
    fitting = [f"{p}: {','.join(map(str, f['blocks']))}" for p, f in USUAL_FEATURES.items()
               if max(f["blocks"]) < num_blocks]
    return f"usual choices: {'; '.join(fitting)}" if fitting else ""


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
                                  f"it loads as preset {' / '.join(fits)}: pass "
                                  f"`preset={fits[0]}`") from exc
        return cls(model, flags, sha256=digest, device=device)

    @classmethod
    def random(cls, flags: ModelFlags | Mapping | str | Path, seed: int = 0,
               device: str | torch.device = "cpu") -> "Backbone":
        """A randomly initialised model (PyTorch's default init, seeded), for benchmarks."""
        flags = ModelFlags.resolve(flags)
        with seeded_init(seed):  # the caller's random streams stay as they were
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
        blocks = range(self.num_blocks) if blocks is None else self._check_blocks(blocks)
        size = self.flags.image_size
        return {b: (self.model.decoder_shapes[b][0], size // self.model.decoder_shapes[b][1],
                    size // self.model.decoder_shapes[b][1]) for b in blocks}

    @property
    def ident(self) -> BackboneId:
        """Checkpoint hash and flags."""
        return BackboneId(self.sha256, self.flags.to_dict())

    def __repr__(self) -> str:
        return (f"Backbone(image_size={self.flags.image_size}, "
                f"num_channels={self.flags.num_channels}, device={self.device}, "
                f"sha256={self.sha256[:12]!r})")

    # -- extraction -------------------------------------------------------------------------

    def _noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, 3, height, width)

    def _check_blocks(self, blocks) -> tuple[int, ...]:
        return check_blocks(blocks, self.num_blocks, names=False,
                            hint=blocks_hint(self.num_blocks))

    def _check_image(self, x0: torch.Tensor) -> torch.Tensor:
        levels = len(self.flags.mult)
        return check_image(x0, self.device, 2 ** (levels - 1), f"this UNet's {levels} levels")

    def _check_labels(self, y, num_images: int) -> torch.Tensor | None:
        if (y is None) != (self.flags.num_classes is None):
            raise ConfigError("class labels y are needed for class_cond models and only for them")
        if y is None:
            return None
        y = torch.as_tensor(y, dtype=torch.long, device=self.device).reshape(-1)
        if y.shape[0] != num_images:
            raise BadInputError(f"y has {y.shape[0]} labels for {num_images} images")
        return y

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
        job = self._job(x0, steps, blocks, noise, seed, max_batch, precision)
        y = self._check_labels(y, job.x0.shape[0])

        def run(imgs: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
            imgs, t = imgs.to(self.device), t.to(self.device)
            x_t = self.schedule.q_sample(job.x0[imgs], t, job.noise)
            feats = self.model.decoder_features(
                x_t, self.schedule.model_timesteps(t), job.blocks,
                y=None if y is None else y[imgs])
            return [feats[b] for b in job.blocks]

        with torch.inference_mode(), job.autocast:
            return self._gather(job, run)

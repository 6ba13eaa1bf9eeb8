"""One entry point that turns a checkpoint spec into a backbone, whatever its kind.

A spec is what ``--checkpoint`` / ``model.checkpoint`` holds:

- a file (or ``bundled:faces_64``): a guided-diffusion ADM state dict, built with the model
  flags ``flags`` (a preset name, a flags JSON or a dict);
- a folder: a diffusers model, read from disk only. A pipeline folder with ``vae/`` and a
  text-conditioned ``unet/`` is Stable Diffusion; any other (``unet/`` or a bare model folder)
  is a ``UNet2DModel``. ``flags`` is ignored there, except that a dict with a "prompt" (as
  a Stable Diffusion store's fingerprint records it) sets the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.backbone.base import FeatureBackbone


@dataclass(frozen=True)
class Layout:
    """What extraction checks before loading any weights, under ModelFlags' names."""

    image_size: int
    diffusion_steps: int


def _is_loaded(spec) -> bool:
    # Duck-typed: wrappers of a backbone (benchmarks time one) count as loaded backbones.
    return isinstance(spec, FeatureBackbone) or hasattr(spec, "activations")


def is_diffusers(spec) -> bool:
    """Whether a checkpoint spec names a diffusers folder (else an ADM file)."""
    return spec is not None and not _is_loaded(spec) and \
        Path(resolve_checkpoint(spec)).expanduser().is_dir()


def _prompt(flags, prompt):
    if prompt is None and isinstance(flags, Mapping):
        prompt = flags.get("prompt")
    return prompt


def load_backbone(spec, flags=None, device="cpu", prompt: str | None = None) -> FeatureBackbone:
    """The backbone ``spec`` names (see the module docstring), on ``device``.

    ``prompt``: Stable Diffusion's conditioning text (default: the empty prompt).
    """
    from ddpmseg.backbone.adm.extractor import Backbone

    if not is_diffusers(spec):
        return Backbone.from_checkpoint(spec, flags, device=device)
    from ddpmseg.backbone.hf.sd import StableDiffusionBackbone, is_stable_diffusion

    root = Path(resolve_checkpoint(spec)).expanduser()
    if is_stable_diffusion(root):
        return StableDiffusionBackbone.from_folder(root, device=device,
                                                   prompt=_prompt(flags, prompt))
    from ddpmseg.backbone.hf.unet2d import DiffusersUNetBackbone

    return DiffusersUNetBackbone.from_folder(root, device=device)


def describe_backbone(spec, flags=None):
    """Image size and step count of a backbone (loaded, or named by a spec) without loading
    any weights: an ADM spec gives its ModelFlags, a diffusers folder its configs' values."""
    from ddpmseg.backbone.adm.flags import ModelFlags

    if _is_loaded(spec):
        return getattr(spec, "flags", None) or Layout(spec.image_size, spec.num_steps)
    if not is_diffusers(spec):
        return ModelFlags.resolve(flags)
    from ddpmseg.backbone.hf.unet2d import read_config, scheduler_dir, unet_folder
    from ddpmseg.backbone.hf.sd import is_stable_diffusion

    root = Path(resolve_checkpoint(spec)).expanduser()
    unet = read_config(unet_folder(root))
    size = unet.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if is_stable_diffusion(root):
        size *= 2 ** (len(read_config(root / "vae").get("block_out_channels", (0,))) - 1)
    sched = scheduler_dir(root)
    steps = 1000 if sched is None else \
        read_config(sched, "scheduler_config.json").get("num_train_timesteps", 1000)
    return Layout(int(size), int(steps))

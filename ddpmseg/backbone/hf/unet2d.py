"""diffusers' ``UNet2DModel`` (Ho et al.'s DDPM models) as a ddpmseg backbone.

Needs the optional extra (``pip install ddpmseg[diffusers]``), imported only here. Models load
from a local folder only (``local_files_only=True``): nothing is ever downloaded. A folder is a
diffusers pipeline folder (``unet/``, ``scheduler/``) or a bare model folder (``config.json``
and the weights, ``scheduler_config.json`` beside them).

Activations are read with forward hooks on diffusers' own modules while diffusers' own forward
runs, so they are by definition those of the reference implementation; once every requested
module has produced its output the forward is abandoned, so the rest of the decoder is never
computed.

Blocks: an integer i or ``"up{i}"`` is ``up_blocks[i]``; ``"up{i}.res{j}"`` its j-th resnet,
``"up{i}.attn{j}"`` its j-th attention, ``"up{i}.upsample"`` its upsampler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ddpmseg.core.device import resolve_device
from ddpmseg.core.errors import CheckpointError, ConfigError, InputNotFoundError
from ddpmseg.spec import BackboneId, BlockId, check_blocks
from ddpmseg.backbone.base import FeatureBackbone, check_image
from ddpmseg.core.fileio import sha256_file

log = logging.getLogger(__name__)

EXTRA_HINT = "install the optional extra: pip install 'ddpmseg[diffusers]'"
# Files that decide what a model computes; a README or an image beside them does not.
FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")
_BLOCK = re.compile(r"^up(\d+)(?:\.(res|attn)(\d+)|\.(upsample))?$")


def import_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigError(f"this backbone needs the diffusers package ({exc})", EXTRA_HINT) from exc
    return diffusers


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{path} does not exist",
                                 "give the folder that diffusers' save_pretrained wrote") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc})", "re-download the model folder") from exc


def unet_folder(root: Path) -> Path:
    """Where the UNet's config.json is: ``root/unet`` in a pipeline folder, else ``root``."""
    for folder in (root / "unet", root):
        if (folder / "config.json").is_file():
            return folder
    raise InputNotFoundError(f"{root} holds no diffusers model (no config.json in it or in "
                             f"{root / 'unet'})",
                             "give a folder written by diffusers' save_pretrained")


def folder_fingerprint(folders: Iterable[Path], root: Path) -> str:
    """sha256 over the (relative path, sha256) of every weight and config file of ``folders``."""
    lines = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in FINGERPRINT_SUFFIXES:
                lines.append(f"{path.relative_to(root).as_posix()}\t{sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def scheduler_dir(root: Path) -> Path | None:
    """The folder holding scheduler_config.json: ``root/scheduler`` or ``root``; None if none."""
    for folder in (root / "scheduler", root):
        if (folder / "scheduler_config.json").is_file():
            return folder
    return None


def load_scheduler(root: Path):
    """A DDPMScheduler with the folder's noise schedule (its ``add_noise`` is q_sample), and
    the folder its config came from."""
    diffusers = import_diffusers()
    folder = scheduler_dir(root)
    if folder is None:
        log.warning("%s has no scheduler_config.json: using DDPM's linear schedule over 1000 "
                    "steps", root)
        return diffusers.DDPMScheduler(), None
    cfg = read_config(folder, "scheduler_config.json")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return diffusers.DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg}), folder


@contextlib.contextmanager
def _quiet_loading():
    """No loading progress bars from diffusers/transformers unless stderr is a terminal."""
    if sys.stderr.isatty():
        yield
        return
    import importlib

    libs = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = importlib.import_module(name)
        except ImportError:
            continue
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            libs.append(lib)
    try:
        yield
    finally:
        for lib in libs:
            lib.enable_progress_bar()


def load_pretrained(cls, folder: Path, what: str, allow_unexpected: bool = False):
    """``cls.from_pretrained(folder, local_files_only=True)``, strict: a missing, unexpected or
    mis-shaped weight is a CheckpointError (diffusers would only log it). ``allow_unexpected``:
    weights the model does not use are only logged (old CLIP text encoders carry a buffer that
    newer transformers no longer has)."""
    try:
        with _quiet_loading():
            model, info = cls.from_pretrained(str(folder), local_files_only=True,
                                              output_loading_info=True,
                                              low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = " ".join(lines[:3]) if lines else type(exc).__name__
        raise CheckpointError(f"cannot load the {what} from {folder}: {detail}",
                              "check that the folder is a complete diffusers model") from exc
    if allow_unexpected and info.get("unexpected_keys"):
        log.info("%s: ignoring unused weights %s", folder, list(info["unexpected_keys"])[:5])
        info = {k: v for k, v in info.items() if k != "unexpected_keys"}
    problems = [f"{key.replace('_', ' ')}: {', '.join(map(str, list(items)[:5]))}"
                for key, items in sorted(info.items()) if items and key != "error_msgs"]
    if info.get("error_msgs"):
        problems.append("; ".join(map(str, info["error_msgs"][:3])))
    if problems:
        raise CheckpointError(f"the {what} in {folder} does not match its config.json: "
                              + "; ".join(problems),
                              "re-download the folder (weights and config.json must belong "
                              "together)")
    return model.float().eval().requires_grad_(False)


def _first_tensor(out) -> torch.Tensor:
    """A module's output as a tensor: blocks may return tuples or output dataclasses."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return _first_tensor(out.sample)


def up_block_shape(block_out_channels, latent_size: int, i: int, kind: str | None = None,
                   _j: int = 0) -> tuple[int, int, int]:
    """(C, h, w) of up_blocks[i] (or of its resnet/attention/upsampler ``kind``) for a
    latent_size input: diffusers builds up block i at the resolution of level i from the
    bottom, with the widths reversed, ending with an upsampler except the last."""
    channels = list(reversed(block_out_channels))
    levels = len(channels)
    size = latent_size // 2 ** (levels - 1) * 2 ** i
    if kind in (None, "upsample") and i < levels - 1:
        size *= 2
    return channels[i], size, size


class _Enough(Exception):
    """Raised by a hook once every requested output is in: ends the forward early."""


class DiffusersBackbone(FeatureBackbone):
    """Shared by the diffusers kinds: named decoder modules, hooks, early exit, fingerprint.

    A subclass sets ``self.unet`` (whose ``up_blocks`` are read), ``self.scheduler``,
    ``self.factor`` (input pixels per UNet pixel) and implements ``_prepare`` and ``_denoise``.
    """

    unet: torch.nn.Module
    scheduler: object
    factor: int = 1
    noise_channels: int = 3
    prompt: str | None = None

    # -- description --------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.factor

    @property
    def num_steps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def num_blocks(self) -> int:
        return len(self.unet.up_blocks)

    def module(self, block: BlockId) -> torch.nn.Module:
        """The diffusers module a block id names."""
        i, kind, j = self._parse(block)
        up = self.unet.up_blocks[i]
        if kind is None:
            return up
        if kind == "upsample":
            return up.upsamplers[0]
        return (up.resnets if kind == "res" else up.attentions)[j]

    def _parse(self, block: BlockId) -> tuple[int, str | None, int]:
        if isinstance(block, int) and not isinstance(block, bool):
            i, kind, j = block, None, 0
        else:
            m = _BLOCK.match(str(block))
            if not m:
                raise ConfigError(f"unknown block {block!r}",
                                  "use an index of up_blocks, or a name like up2, up2.res1, "
                                  "up2.attn0 or up2.upsample")
            i, j = int(m.group(1)), int(m.group(3) or 0)
            kind = m.group(2) or m.group(4)
        if not 0 <= i < self.num_blocks:
            raise ConfigError(f"block {block!r} is out of range: the UNet has "
                              f"{self.num_blocks} up_blocks (0..{self.num_blocks - 1})")
        up = self.unet.up_blocks[i]
        if kind == "upsample" and not getattr(up, "upsamplers", None):
            raise ConfigError(f"block {block!r}: up_blocks[{i}] has no upsampler")
        if kind in ("res", "attn"):
            items = getattr(up, "resnets" if kind == "res" else "attentions", None) or []
            if not 0 <= j < len(items):
                raise ConfigError(f"block {block!r}: up_blocks[{i}] has {len(items)} "
                                  f"{'resnets' if kind == 'res' else 'attentions'}")
        return i, kind, j

    def block_shapes(self, blocks=None) -> dict:
        """{block: (C, h, w)} for an image_size input, from the config (no forward pass)."""
        if blocks is None:
            blocks = range(self.num_blocks)
        latent = self.image_size // self.factor
        return {b: up_block_shape(self.unet.config.block_out_channels, latent, *self._parse(b))
                for b in blocks}

    @property
    def ident(self) -> BackboneId:
        """Kind, the folder's fingerprint and (Stable Diffusion) the prompt."""
        flags = {} if self.prompt is None else {"prompt": self.prompt}
        return BackboneId(self.sha256, flags, self.kind)

    def parameter_count(self) -> int:
        return sum(p.numel() for m in self._modules_used() for p in m.parameters())

    def _modules_used(self) -> list[torch.nn.Module]:
        return [self.unet]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.root}, image_size={self.image_size}, "
                f"device={self.device}, sha256={self.sha256[:12]!r})")

    # -- extraction ---------------------------------------------------------------------------
    def _noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, self.noise_channels, height // self.factor, width // self.factor)

    def _check_blocks(self, blocks) -> tuple[BlockId, ...]:
        blocks = check_blocks(blocks, self.num_blocks)
        for b in blocks:
            self._parse(b)
        return blocks

    def _check_image(self, x0) -> torch.Tensor:
        levels = len(self.unet.config.block_out_channels)
        return check_image(x0, self.device, self.factor * 2 ** (levels - 1),
                           f"this model ({levels} UNet levels, {self.factor}x latent)")

    def _prepare(self, x0: torch.Tensor) -> torch.Tensor:
        """Images -> what the scheduler noises (pixels, or latents)."""
        return x0

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> None:
        raise NotImplementedError

    def activations(self, x0, steps: Sequence[int], blocks: Sequence[BlockId],
                    noise: torch.Tensor | None = None, seed: int = 0, *,
                    max_batch: int | None = None, precision: str = "fp32") -> dict:
        job = self._job(x0, steps, blocks, noise, seed, max_batch, precision)
        modules = [self.module(b) for b in job.blocks]
        with torch.inference_mode(), job.autocast, _capturing(modules) as captured:
            z0 = self._prepare(job.x0)

            def run(imgs: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
                z = z0[imgs.to(self.device)]
                x_t = self.scheduler.add_noise(z, job.noise.expand_as(z), t.to(self.device))
                captured.clear()
                try:
                    self._denoise(x_t, t.to(self.device))
                except _Enough:
                    pass
                if len(captured) != len(modules):
                    # A diffusers version whose forward we do not know.
                    raise CheckpointError("the UNet's forward did not reach every requested "
                                          "block", "use the diffusers version the [diffusers] "
                                          "extra names")
                return [captured[k] for k in range(len(modules))]

            return self._gather(job, run)


@contextlib.contextmanager
def _capturing(modules: Sequence[torch.nn.Module]):
    """{k: float output of modules[k]} filled by forward hooks during the ``with`` block; the
    hook that completes it raises ``_Enough`` to end the forward early."""
    captured: dict[int, torch.Tensor] = {}

    def hook(k):
        def fn(_module, _inputs, output):
            captured[k] = _first_tensor(output).float()
            if len(captured) == len(modules):
                raise _Enough
        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class DiffusersUNetBackbone(DiffusersBackbone):
    """A diffusers ``UNet2DModel`` (pixel space) with its scheduler's noise schedule."""

    kind = "diffusers-unet"

    def __init__(self, unet, scheduler, sha256: str = "", device="cpu", root: str | Path = ""):
        if getattr(unet.config, "num_class_embeds", None) or \
                getattr(unet.config, "class_embed_type", None):
            raise ConfigError("class-conditional UNet2DModels are not supported",
                              "use an unconditional model")
        self.device = resolve_device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.sha256 = sha256
        self.root = Path(root)
        self.noise_channels = int(unet.config.in_channels)
        if self.noise_channels != 3:
            raise ConfigError(f"the UNet takes {self.noise_channels} input channels, not an "
                              "RGB image", "for a latent model give the whole Stable Diffusion "
                              "folder (with vae/)")

    @classmethod
    def from_folder(cls, path: str | Path, device="cpu") -> "DiffusersUNetBackbone":
        diffusers = import_diffusers()
        root = Path(path).expanduser()
        folder = unet_folder(root)
        scheduler, sched_dir = load_scheduler(root)
        digest = folder_fingerprint(dict.fromkeys(d for d in (folder, sched_dir) if d), root)
        unet = load_pretrained(diffusers.UNet2DModel, folder, "UNet2DModel")
        return cls(unet, scheduler, sha256=digest, device=device, root=root)

    def _denoise(self, x_t, t) -> None:
        self.unet(x_t, t, return_dict=False)

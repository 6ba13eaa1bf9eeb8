"""Stable Diffusion (a diffusers pipeline folder) as a ddpmseg backbone.

The image is encoded by the VAE (the mean of its latent distribution, times the VAE's scaling
factor: no sampling, so features are deterministic), noised in latent space with the folder's
schedule, and denoised by the ``UNet2DConditionModel`` conditioned on the text embedding of a
prompt, by default the empty one (computed once, when the backbone is built). Block maps are at
latent resolution; pixel features upsample them to the image size as for every backbone.

Needs ``unet/``, ``vae/``, ``text_encoder/`` and ``tokenizer/`` (``scheduler/`` optional) and the
optional extra (``pip install ddpmseg[diffusers]``, which brings transformers for the CLIP text
encoder). Loaded with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpmseg.core.device import resolve_device
from ddpmseg.core.errors import ConfigError, InputNotFoundError
from ddpmseg.backbone.hf.unet2d import (
    EXTRA_HINT,
    DiffusersBackbone,
    folder_fingerprint,
    import_diffusers,
    load_pretrained,
    load_scheduler,
)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


def is_stable_diffusion(root: Path) -> bool:
    """A pipeline folder whose UNet is text-conditioned and that has a VAE."""
    return (root / "vae" / "config.json").is_file() and (root / "unet" / "config.json").is_file()


def text_embedding(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """(1, L, D) last hidden state of the text encoder for ``prompt``, as SD pipelines build it."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(device)
    with torch.inference_mode():
        return text_encoder(ids.input_ids.to(device), attention_mask=mask)[0].float()


class StableDiffusionBackbone(DiffusersBackbone):
    """VAE + text encoder + ``UNet2DConditionModel``; blocks are the UNet's up_blocks."""

    kind = "stable-diffusion"

    def __init__(self, unet, vae, embedding: torch.Tensor, scheduler, *, prompt: str = "",
                 sha256: str = "", device="cpu", root: str | Path = ""):
        if getattr(unet.config, "addition_embed_type", None) or \
                getattr(unet.config, "class_embed_type", None):
            raise ConfigError("this UNet needs extra conditioning (SDXL-style added embeddings "
                              "or class labels), which is not supported",
                              "use a Stable Diffusion 1.x/2.x folder")
        self.device = resolve_device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.embedding = embedding.to(self.device, torch.float32)
        self.scheduler = scheduler
        self.prompt = str(prompt)
        self.sha256 = sha256
        self.root = Path(root)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.noise_channels = int(unet.config.in_channels)

    @classmethod
    def from_folder(cls, path: str | Path, device="cpu", prompt: str | None = None
                    ) -> "StableDiffusionBackbone":
        diffusers = import_diffusers()
        try:
            import transformers
        except ImportError as exc:
            raise ConfigError(f"Stable Diffusion needs the transformers package ({exc})",
                              EXTRA_HINT) from exc
        root = Path(path).expanduser()
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise InputNotFoundError(f"{root} is not a Stable Diffusion folder: no "
                                     f"{', '.join(m + '/' for m in missing)}",
                                     "give the pipeline folder save_pretrained wrote (unet/, "
                                     "vae/, text_encoder/, tokenizer/)")
        scheduler, sched_dir = load_scheduler(root)
        folders = [root / c for c in COMPONENTS] + ([sched_dir] if sched_dir else [])
        digest = folder_fingerprint(dict.fromkeys(folders), root)
        unet = load_pretrained(diffusers.UNet2DConditionModel, root / "unet",
                               "UNet2DConditionModel")
        vae = load_pretrained(diffusers.AutoencoderKL, root / "vae", "VAE")
        encoder = load_pretrained(transformers.CLIPTextModel, root / "text_encoder",
                                  "text encoder", allow_unexpected=True)
        try:
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"),
                                                                   local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise InputNotFoundError(f"cannot load the tokenizer from {root / 'tokenizer'} "
                                     f"({exc})", "re-download the model folder") from exc
        prompt = "" if prompt is None else str(prompt)
        dev = resolve_device(device)
        embedding = text_embedding(tokenizer, encoder.to(dev), prompt, dev)
        return cls(unet, vae, embedding, scheduler, prompt=prompt, sha256=digest, device=dev,
                   root=root)

    def _modules_used(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae]

    def _prepare(self, x0: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(x0).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latent = latent - shift
        return latent * self.vae.config.scaling_factor

    def _denoise(self, x_t, t) -> None:
        cond = self.embedding.expand(x_t.shape[0], -1, -1)
        self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)

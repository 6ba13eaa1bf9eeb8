"""``ddpmseg check-checkpoint``: verify a downloaded checkpoint against its preset."""

from __future__ import annotations

import click

from ..backbone.factory import load_backbone


@click.command("check-checkpoint")
@click.argument("checkpoint")
@click.option("--preset", default="lsun_256", show_default=True,
              help="Model preset name, or a JSON file of guided-diffusion flags (not used for "
                   "a diffusers folder, whose config.json says it all).")
def command(checkpoint: str, preset: str) -> None:
    """Load CHECKPOINT strictly and print its sha256: a guided-diffusion .pt file into PRESET's
    architecture, or a diffusers model folder (UNet2DModel, or Stable Diffusion's unet, vae and
    text encoder) into the models its config.json files describe.

    \b
    Examples:
      ddpmseg check-checkpoint lsun_horse.pt --preset lsun_256
      ddpmseg check-checkpoint models/ddpm-ema-church-256
    """
    backbone = load_backbone(checkpoint, preset, device="cpu")
    what = preset if backbone.kind == "adm" else f"a {backbone.kind} folder"
    click.echo(f"ok: {checkpoint} loads strictly as {what}")
    click.echo(f"sha256: {backbone.sha256}")
    click.echo(f"image size: {backbone.image_size}, steps: {backbone.num_steps}")
    click.echo(f"parameters: {backbone.parameter_count():,}")

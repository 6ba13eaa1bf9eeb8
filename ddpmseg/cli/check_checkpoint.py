"""``ddpmseg check-checkpoint``: verify a downloaded checkpoint against its preset."""

from __future__ import annotations

import click



@click.command("check-checkpoint")
@click.argument("checkpoint_arg", metavar="[CHECKPOINT]", required=False)
@click.option("--checkpoint", default=None, metavar="PATH",
              help="The checkpoint, spelled as in the other commands (or give it positionally).")
@click.option("--preset", default=None, metavar="NAME|JSON",
              help="Model preset name, or a JSON file of guided-diffusion flags (not used for "
                   "a diffusers folder, whose config.json says it all). [default: faces_64 for "
                   "bundled:faces_64, else lsun_256]")
def command(checkpoint_arg: str | None, checkpoint: str | None, preset: str | None) -> None:
    """Load CHECKPOINT strictly and print its sha256: a guided-diffusion .pt file into PRESET's
    architecture, or a diffusers model folder (UNet2DModel, or Stable Diffusion's unet, vae and
    text encoder) into the models its config.json files describe.

    \b
    Examples:
      ddpmseg check-checkpoint lsun_horse.pt --preset lsun_256
      ddpmseg check-checkpoint models/ddpm-ema-church-256
      ddpmseg check-checkpoint --checkpoint bundled:faces_64
    """
    from ddpmseg.backbone.adm.checkpoint import checkpoint_dtypes
    from ddpmseg.backbone.factory import load_backbone
    from ddpmseg.backbone.bundled import resolve_checkpoint
    from ddpmseg.config import Config
    from ddpmseg.pipelines.extract import resolve_model

    if checkpoint_arg and checkpoint and checkpoint_arg != checkpoint:
        raise click.UsageError("give the checkpoint once: CHECKPOINT or --checkpoint")
    checkpoint = checkpoint or checkpoint_arg
    if not checkpoint:
        raise click.UsageError("give the checkpoint: CHECKPOINT or --checkpoint PATH")
    # The preset extract would build this checkpoint with (a bundled one brings its own).
    preset = resolve_model(Config(), checkpoint, preset=preset).model.preset
    backbone = load_backbone(checkpoint, preset, device="cpu")
    what = preset if backbone.kind == "adm" else f"a {backbone.kind} folder"
    click.echo(f"ok: {checkpoint} loads strictly as {what}")
    click.echo(f"sha256: {backbone.sha256}")
    click.echo(f"image size: {backbone.image_size}, steps: {backbone.num_steps}")
    click.echo(f"parameters: {backbone.parameter_count():,}")
    if backbone.kind == "adm":
        dtypes = checkpoint_dtypes(resolve_checkpoint(checkpoint))
        click.echo(f"dtype: {', '.join(dtypes)} (features are computed in float32)")

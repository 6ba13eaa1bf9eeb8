"""``ddpmseg check-checkpoint``: verify a downloaded checkpoint against its preset."""

from __future__ import annotations

import click

from ..backbone import Backbone
from ..bundled import resolve_checkpoint


@click.command("check-checkpoint")
@click.argument("checkpoint")
@click.option("--preset", default="lsun_256", show_default=True,
              help="Model preset name, or a JSON file of guided-diffusion flags.")
def command(checkpoint: str, preset: str) -> None:
    """Load CHECKPOINT strictly into PRESET's architecture and print its sha256.

    \b
    Example:
      ddpmseg check-checkpoint lsun_horse.pt --preset lsun_256
    """
    backbone = Backbone.from_checkpoint(resolve_checkpoint(checkpoint), preset, device="cpu")
    count = sum(p.numel() for p in backbone.model.parameters())
    click.echo(f"ok: {checkpoint} loads strictly as {preset}")
    click.echo(f"sha256: {backbone.sha256}")
    click.echo(f"parameters: {count:,}")

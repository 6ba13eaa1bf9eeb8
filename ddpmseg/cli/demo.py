"""``ddpmseg demo``."""

from __future__ import annotations

import click

from ..demo import demo
from .common import config_option, device_option, resolve_config


@click.command("demo")
@click.option("--out", default="ddpmseg-demo", show_default=True, help="Output folder.")
@config_option
@device_option
def command(out: str, config_path: str | None, device: str) -> None:
    """Run extract, fit, predict and evaluate on bundled face images (64px) with the bundled
    adm_faces64 backbone, write the HTML report and print the path of its index.html. A few
    minutes on 2 CPU cores; rerun to resume.

    \b
    Example:
      ddpmseg demo --out ddpmseg-demo
    """
    result = demo(out, config=resolve_config(config_path or "faces64_ffhq_34"), device=device)
    click.echo(result["report"])

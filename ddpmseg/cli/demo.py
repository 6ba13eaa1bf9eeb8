"""``ddpmseg demo``."""

from __future__ import annotations

import click

from ddpmseg.cli.common import config_option, device_option, resolve_config, show_progress


@click.command("demo")
@click.option("--out", default="ddpmseg-demo", show_default=True, help="Output folder.")
@config_option
@device_option
@click.pass_context
def command(ctx, out: str, config_path: str | None, device: str) -> None:
    """Run extract, fit, predict and evaluate on bundled face images (64px) with the bundled
    adm_faces64 backbone, write the HTML report, and print the per-class IoU table and the
    path of the report's index.html (stdout). A few minutes on 2 CPU cores; rerun to resume.

    \b
    Example:
      ddpmseg demo --out ddpmseg-demo
    """
    from ddpmseg.pipelines.demo import demo
    from ddpmseg.outputs.evaluate import format_table

    result = demo(out, config=resolve_config(config_path or "faces64_ffhq_34"), device=device,
                  progress=show_progress(ctx))
    click.echo(format_table(result))
    click.echo(result["report"])

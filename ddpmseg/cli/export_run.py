"""``ddpmseg export-run``: a ddpmseg run -> files the reference's code loads."""

from __future__ import annotations

import click


@click.command("export-run")
@click.argument("run_dir", metavar="RUN")
@click.argument("out_dir", metavar="OUT_DIR")
@click.option("--format", "fmt", type=click.Choice(["reference"]), default="reference",
              show_default=True,
              help="reference: ddpm-segmentation's ddpm.json + pixel_classifiers/model_{i}.pth.")
@click.option("--overwrite", is_flag=True, help="Replace files already in OUT_DIR.")
def command(run_dir, out_dir, fmt, overwrite):
    """Write the ensemble of RUN in another tool's format into OUT_DIR.

    With --format reference: OUT_DIR/ddpm.json (absolute model_path and exp_dir) and
    OUT_DIR/pixel_classifiers/<steps>_<blocks>/model_{i}.pth (nn.DataParallel state dicts,
    where and as the reference saves them). The ETF head is not exported (the reference has
    none; prediction does not use it), which is said on stderr.

    \b
    Examples:
      ddpmseg export-run runs/ffhq34 exported/ffhq34 --format reference
    """
    from ddpmseg.interop.reference_run import export_run

    path = export_run(run_dir, out_dir, format=fmt, overwrite=overwrite)
    members = sorted(path.parent.glob("pixel_classifiers/*/model_*.pth"))
    click.echo(f"wrote {path} and {len(members)} member(s) in {members[0].parent}")

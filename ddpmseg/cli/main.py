"""The ``ddpmseg`` click group and its error handling.

Our errors become one line ``error: <what>; <how to fix>`` and exit 1 (2 for usage errors);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys

import click

from .. import __version__
from ..errors import DdpmsegError

# Each command lives in its own module of this package, named like the command.
COMMANDS = ("extract", "fit", "predict", "evaluate", "report", "demo", "check_checkpoint",
            "train_backbone", "import_run", "export_run", "verify")


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdpmsegError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)
        except OSError as exc:
            # A disk error outside the paths that say more (a full disk while writing
            # predictions, a permission denied): one line, never a traceback.
            if ctx.params.get("debug") or exc.errno is None:
                raise
            click.echo(f"error: {os_error_line(exc)}", err=True)
            ctx.exit(1)


def os_error_line(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; free some space and rerun the same "
                "command: it resumes where it stopped")
    return f"{exc.strerror or exc}{where}; check the path, its permissions and free space"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddpmseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(debug: bool, quiet: bool) -> None:
    """Label-efficient semantic segmentation from diffusion-model features.

    \b
    ddpmseg extract   images (+ masks) -> feature store
    ddpmseg fit       feature store -> trained ensemble (a run directory)
    ddpmseg predict   run + images or store -> masks, overlays, uncertainty
    ddpmseg evaluate  predictions + ground truth -> per-class IoU, mIoU
    ddpmseg report    predictions (+ ground truth) -> HTML page: tables, pictures
    ddpmseg demo      all four on bundled face images and a small bundled backbone
    ddpmseg train-backbone  train an ADM diffusion model on your own unlabelled images
    ddpmseg import-run / export-run  move runs from / to ddpm-segmentation's format
    ddpmseg verify    read every chunk of a store, or every member of a run: report damage
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr, force=True)


for _name in COMMANDS:
    cli.add_command(importlib.import_module(f".{_name}", __package__).command)


def main() -> None:
    cli(prog_name="ddpmseg")

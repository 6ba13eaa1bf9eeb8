"""The ``ddpmseg`` click group and its error handling.

Our errors become one line ``error: <what>; <how to fix>`` and exit 1 (2 for usage errors);
``--debug`` shows the traceback instead. So do an object store's (botocore's) errors of
credentials, endpoint and bucket (``core.objectstore.access_problem``).
"""

from __future__ import annotations

import errno
import importlib
import re

import click

from ddpmseg.core import objectstore
from ddpmseg.core.version import __version__
from ddpmseg.core.errors import DdpmsegError
from ddpmseg.cli.common import as_flags, configure_logging, global_options

# Each command lives in its own module of this package, named like the command.
COMMANDS = ("extract", "fit", "predict", "evaluate", "report", "demo", "check_checkpoint",
            "train_backbone", "import_run", "export_run", "suggest", "sweep", "verify",
            "labels")


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdpmsegError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {as_flags(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # permission, no space, a file where a folder goes, ...
            if ctx.params.get("debug"):
                raise
            problem = objectstore.access_problem(exc)
            click.echo(f"error: {problem or os_error_line(exc)}", err=True)
            ctx.exit(1)
        except Exception as exc:  # an object store lost mid-run: botocore's, one line too
            problem = objectstore.access_problem(exc)
            if problem is None or ctx.params.get("debug"):
                raise
            click.echo(f"error: {problem}", err=True)
            ctx.exit(problem.exit_code)
        except KeyboardInterrupt:
            after = _INTERRUPTED.get(ctx.invoked_subcommand or "",
                                     "rerun the same command to resume")
            click.echo(f"error: interrupted; {after}", err=True)
            ctx.exit(130)


# What an interrupted command leaves, where it is not "a rerun resumes": predict writes its
# prediction aside and swaps it in whole (ddpmseg.outputs.folder).
_INTERRUPTED = {"predict": "the prediction folder is as it was; rerun the same command to "
                           "predict again"}


_OS_HINTS = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "free some space, or choose a folder on another disk",
    errno.EDQUOT: "free some space, or choose a folder on another disk",
    errno.ENOTDIR: "a file stands where a folder is needed; remove it or choose another path",
    errno.EEXIST: "a file stands where a folder is needed; remove it or choose another path",
    errno.EISDIR: "a folder stands where a file is needed; choose another path",
    errno.ENOENT: "check the path",
}


def os_error_line(exc: OSError) -> str:
    """``what: path; how to fix`` for an OS error, naming the path(s) it concerns."""
    what = exc.strerror or str(exc)
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = f": {' -> '.join(map(str, paths))}" if paths else ""
    hint = _OS_HINTS.get(exc.errno, "check the path and try again")
    return f"{what}{where}; {hint}"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ddpmseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("--no-progress", is_flag=True, help="No progress bars (there are none unless "
                                                 "stderr is a terminal).")
def cli(debug: bool, quiet: bool, no_progress: bool) -> None:
    """Label-efficient semantic segmentation from diffusion-model features.

    \b
    ddpmseg extract   images (+ masks) -> feature store
    ddpmseg fit       feature store -> trained ensemble (a run directory)
    ddpmseg predict   run + images or store -> masks, overlays, uncertainty
    ddpmseg evaluate  predictions + ground truth -> per-class IoU, mIoU
    ddpmseg report    predictions (+ ground truth) -> HTML page: tables, pictures
    ddpmseg suggest   run + unlabelled images -> which to label next
    ddpmseg sweep     train + test stores -> which steps and blocks to use
    ddpmseg demo      all four on bundled face images and a small bundled backbone
    ddpmseg train-backbone  train an ADM diffusion model on your own unlabelled images
    ddpmseg import-run / export-run  move runs from / to ddpm-segmentation's format
    ddpmseg verify    read every chunk of a store, or every member of a run: report damage

    -q, --debug and --no-progress may also follow the command's name.
    """
    configure_logging(quiet)


for _name in COMMANDS:
    _command = importlib.import_module(f".{_name}", __package__).command
    _command.params.extend(global_options())
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="ddpmseg")

"""Options shared by several commands."""

from __future__ import annotations

import functools
import logging
import re
import sys

import click
from tqdm import tqdm

from ddpmseg.config import Config
from ddpmseg.interop.reference_config import load_config
from ddpmseg.core import objectstore
from ddpmseg.core.device import DEFAULT_THREADS
from ddpmseg.core.errors import DdpmsegError

device_option = click.option(
    "--device", default="auto", show_default=True,
    help="auto (CUDA when present), cpu, cuda or cuda:N.")



def scheduler_option(doing: str = "Process the images", sees: str = "the same files",
                     outcome: str = " The outputs are those of one process."):
    """``--scheduler``, the one definition for every command that spreads its work as
    dask.distributed tasks (the library's ``scheduler=``)."""
    return click.option(
        "--scheduler", default=None, metavar="local|local:N|tcp://HOST:PORT",
        help=f"{doing} as dask.distributed tasks: a local cluster of N worker processes, or "
             f"an existing scheduler whose workers see {sees}.{outcome}")


def threads_option(work: str | None = None):
    """``--threads N``: torch's intra-op threads for this command, passed to the library as
    ``threads=`` (it sets them for the command's length, ``ddpmseg.core.device.use_threads``).

    Unset: OMP_NUM_THREADS when set, else the measured default for ``work``
    (``ddpmseg.core.device.DEFAULT_THREADS``), else one per core.
    """
    default = DEFAULT_THREADS.get(work or "", "one per core")
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, metavar="N",
        help=f"Torch CPU threads. [default: OMP_NUM_THREADS, else {default}]")


# Passed to the library as ``max_image_pixels=`` (None: PIL's limit).
max_pixels_option = click.option(
    "--max-image-pixels", type=click.IntRange(min=1), default=None, metavar="N",
    help="Refuse images with more pixels than N (a guard against decompression bombs). "
         "[default: PIL's, 89478485]")

class _ResizeMode(click.ParamType):
    """A way of fitting images to the model (``spec.RESIZE_MODES``), named in one error."""
    name = "resize"

    def convert(self, value, param, ctx):
        from ddpmseg.spec import RESIZE_MODES

        if value is True or value is False or value in RESIZE_MODES:
            return value
        self.fail(f"{value!r} is not one of {', '.join(RESIZE_MODES)}; a bare --resize takes "
                  "the default way, so put paths before it (or write --resize=pad)", param, ctx)


def resize_option(what: str):
    """``--resize [stretch|pad|tiles]``, alike in every command that fits images to the model;
    a bare ``--resize`` is the default way (``spec.DEFAULT_RESIZE``)."""
    from ddpmseg.spec import DEFAULT_RESIZE

    return click.option(
        "--resize", type=_ResizeMode(), is_flag=False, flag_value=True, default=False,
        metavar="[stretch|pad|tiles]",
        help=f"Fit {what} of another size to the model: stretch (aspect ratio lost), pad "
             "(letterboxed; padding is never trained on nor predicted) or tiles (overlapping "
             f"model-size windows at the image's resolution). Bare --resize: {DEFAULT_RESIZE}.")


config_option = click.option(
    "--config", "config_path", default=None, metavar="TOML|NAME|JSON",
    help="A config file, the name of a bundled one (ffhq_34, bedroom_28, ...), or a "
         "reference ddpm.json.")

# data.num_classes / data.ignore_label, spelled alike in every command that takes them.
num_classes_option = click.option(
    "--num-classes", type=click.IntRange(1, 256), default=None, metavar="N",
    help="Number of classes (data.num_classes). [default: config]")
ignore_label_option = click.option(
    "--ignore-label", type=click.IntRange(0, 255), default=None, metavar="L",
    help="The label that marks unlabelled pixels (data.ignore_label). [default: config, 255]")


def resolve_config(config_path: str | None, base: Config | None = None, **sections: dict
                   ) -> Config:
    """Load the config (``base``, else the defaults, when no --config is given) and apply the
    command-line overrides (None means 'not given'). A bad value is a usage error naming its
    option: each option is its config key with dashes."""
    try:
        cfg = base if config_path is None and base is not None else load_config(config_path)
    except DdpmsegError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from exc
    for section, values in sections.items():
        for key, value in (values or {}).items():
            if value is None:
                continue
            try:
                cfg = cfg.replace(**{section: {key: value}})
            except DdpmsegError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{key.replace('_', '-')}") \
                    from exc
    return cfg


def count(n: int, noun: str) -> str:
    """'1 member', '3 members'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def parse_blocks(value: str | None, name: str = "--blocks") -> tuple[int | str, ...] | None:
    """'5,6,up2.res1' -> (5, 6, 'up2.res1'): block indices, or block names (diffusers)."""
    if value is None:
        return None
    return tuple(int(v) if v.lstrip("-").isdigit() else v
                 for v in value.replace(" ", "").split(",") if v)


def parse_ints(value: str | None, name: str) -> tuple[int, ...] | None:
    """'50,150,250' -> (50, 150, 250); a bad list is a usage error naming the option."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers",
                                 param_hint=name) from exc


def renamed_option(old: str, new: str, dest: str, **kwargs):
    """Keep an old option spelling working for one release: ``old`` fills ``dest`` (the new
    option's parameter) when the new one is not given, and prints a deprecation note."""
    hidden = f"deprecated_{dest}"

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **params):
            value = params.pop(hidden)
            if value is not None:
                click.echo(f"warning: {old} is deprecated and will be removed in the next "
                           f"release; use {new}", err=True)
                if params.get(dest) is None:
                    params[dest] = value
            return f(*args, **params)
        return click.option(old, hidden, default=None, hidden=True, **kwargs)(wrapper)
    return decorate


# -- options every command takes, before or after its name ------------------------------------

class _TqdmHandler(logging.StreamHandler):
    """Log lines printed through tqdm, so a note never lands on a progress bar's line; the
    library's parameters in them shown as the options (``as_flags``), as in error lines."""

    def emit(self, record):
        try:
            tqdm.write(as_flags(self.format(record)), file=sys.stderr)
        except Exception:  # logging must never raise into the command
            self.handleError(record)


def configure_logging(quiet: bool) -> None:
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        handlers=[handler], force=True)
    objectstore.quiet_drivers()  # no "Found credentials in environment variables." lines


def _set_global(ctx, param, value):
    # `ddpmseg fit -q ...` means what `ddpmseg -q fit ...` means: both land on the root context.
    if value:
        ctx.find_root().params[param.name] = True
        if param.name == "quiet":
            configure_logging(quiet=True)
    return value


def global_options() -> list[click.Option]:
    """Fresh -q/--quiet, --debug and --no-progress options (a command's params own them)."""
    return [
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_global,
                     is_eager=True, help="Show full tracebacks on errors."),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_global,
                     is_eager=True, help="Only warnings and errors; no progress bars."),
        click.Option(["--no-progress"], is_flag=True, expose_value=False, callback=_set_global,
                     is_eager=True, help="No progress bars (there are none unless stderr is a "
                                         "terminal)."),
    ]


def show_progress(ctx: click.Context) -> bool:
    """Progress bars only on a terminal, and neither under -q nor --no-progress."""
    root = ctx.find_root().params
    return not (root.get("quiet") or root.get("no_progress")) and sys.stderr.isatty()


# Library parameters whose option is spelled otherwise (the rest: underscores become dashes),
# by name, or by name=value where one value is an option of its own (fit's `resume=False` is
# --overwrite).
_FLAG_NAMES = {"images_dir": "images", "config": "config", "max_pixels": "max-image-pixels",
               "out_dir": "out", "save_every": "save-every-minutes", "resume=False": "overwrite"}
_PARAMETER = re.compile(r"`([a-z_]+)=([^`]*)`")


def as_flags(text: str) -> str:
    """A library message names parameters (`resize=True`, `num_classes=N`); the CLI user gets
    the options (--resize, --num-classes N)."""
    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if f"{name}={value}" in _FLAG_NAMES:
            return "--" + _FLAG_NAMES[f"{name}={value}"]
        option = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
        if value == "True":
            return option
        if value == "False":
            return f"--no-{option[2:]}"
        return f"{option} {value}"
    return _PARAMETER.sub(flag, text)

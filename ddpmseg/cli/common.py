"""Options shared by several commands."""

from __future__ import annotations

import click

from ..config import Config, load_config
from ..data import set_max_image_pixels
from ..device import DEFAULT_THREADS, set_threads
from ..errors import DdpmsegError

device_option = click.option(
    "--device", default="auto", show_default=True,
    help="auto (CUDA when present), cpu, cuda or cuda:N.")



def threads_option(work: str | None = None):
    """``--threads N``: torch's intra-op threads for this command, applied as it is parsed.

    Unset: OMP_NUM_THREADS when set, else the measured default for ``work``
    (``ddpmseg.device.DEFAULT_THREADS``), else one per core.
    """
    def apply(ctx, param, value):
        try:
            set_threads(value, work)
        except DdpmsegError as exc:
            raise click.BadParameter(str(exc), param_hint="--threads") from exc
        return value

    default = DEFAULT_THREADS.get(work or "", "one per core")
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, metavar="N", expose_value=False,
        callback=apply,
        help=f"Torch CPU threads. [default: OMP_NUM_THREADS, else {default}]")


def _apply_max_pixels(ctx, param, value):
    set_max_image_pixels(value)
    return value


max_pixels_option = click.option(
    "--max-image-pixels", type=click.IntRange(min=1), default=None, metavar="N",
    expose_value=False, callback=_apply_max_pixels,
    help="Refuse images with more pixels than N (a guard against decompression bombs). "
         "[default: PIL's, 89478485]")

config_option = click.option(
    "--config", "config_path", default=None, metavar="TOML|NAME|JSON",
    help="A config file, the name of a bundled one (ffhq_34, bedroom_28, ...), or a "
         "reference ddpm.json.")


def resolve_config(config_path: str | None, **sections: dict) -> Config:
    """Load the config and apply the command-line overrides (None means 'not given')."""
    try:
        return load_config(config_path).with_overrides(**sections)
    except DdpmsegError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from exc


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

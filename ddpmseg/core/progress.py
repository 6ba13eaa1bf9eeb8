"""Progress bars: drawn on stderr only when asked and stderr is a terminal (a bar redrawn with
carriage returns turns a log file into tens of kilobytes of noise). Every bar ddpmseg draws is
made by ``bar``."""

from __future__ import annotations

import sys

from tqdm import tqdm


def wanted(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str, progress: bool,
        initial: int = 0, leave: bool = True) -> tqdm:
    """A tqdm bar on stderr; a silent one with the same interface unless ``wanted(progress)``."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                file=sys.stderr, dynamic_ncols=True, disable=not wanted(progress))

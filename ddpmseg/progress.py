"""Whether to draw a progress bar: only when asked and stderr is a terminal (a bar redrawn
with carriage returns turns a log file into tens of kilobytes of noise)."""

from __future__ import annotations

import sys


def wanted(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()

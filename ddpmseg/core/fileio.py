"""Writing files so that a crash never leaves half of one, and hashing them.

Every JSON file ddpmseg writes (run files, predict.json, metrics.json, palette.json, resolved
configs) goes through ``write_json``, tables through ``write_csv``, pictures through
``write_png``, other files through ``atomic_write``. The file appears
whole under its name or not at all: it is written beside its destination under a hidden
temporary name and renamed over it (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ddpmseg.core.errors import InputNotFoundError, OutputError


# atomic_write's temporary files: ".<name>.<pid>.tmp" beside their destination.
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named as ``atomic_write``'s temporary files are (one a killed
    process may have left behind)."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files ``atomic_write`` left in ``folder`` (not below it) when the
    process writing them was killed."""
    for p in Path(folder).iterdir():
        if p.is_file() and is_temporary(p):
            p.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv(path: str | Path, rows) -> Path:
    """``rows`` (lists of cells) as a CSV file, written atomically."""
    def write(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return atomic_write(path, write)


def write_png(path: str | Path, image) -> Path:
    """A PIL image as a PNG file, written atomically."""
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


def write_json(path: str | Path, obj, **dumps) -> Path:
    """``obj`` as indented JSON (plus a final newline), written atomically."""
    text = json.dumps(obj, indent=2, **dumps) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def is_url(path) -> bool:
    """Whether a path names a location by URL (s3://..., memory://, a scheduler's tcp://)
    rather than a local file."""
    return "://" in str(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (multi-GB checkpoints never sit in memory)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"file {path} does not exist", "check the path")
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def json_sha256(value) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces, ASCII): the digest
    of a store's attributes and of its stat cache."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


RESUME_HINT = ("free some space (or choose another path) and rerun the same command: it "
               "resumes where it stopped")


def size_text(n: int) -> str:
    """Bytes as a person reads them: '512 kB', '3.4 MB', '120 MB'."""
    if n < 2 ** 20:
        return f"{max(0, round(n / 1024))} kB"
    return f"{n / 2 ** 20:.1f} MB" if n < 10 * 2 ** 20 else f"{n / 2 ** 20:.0f} MB"


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk (or a full quota): the error ``no_space_error`` words."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space_error(path: str | Path, needed: int | None, what: str, unit: str = "",
                   hint: str = RESUME_HINT) -> OutputError:
    """The one-line error for a disk that filled up while writing ``what`` at ``path``: how
    much more it needs (``needed`` bytes, an upper bound for ``unit``; None: not known) and
    how much is free on that disk now."""
    where = Path(str(path)).expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    parts = [f"about {size_text(needed)} more are needed for {unit}"] if needed else []
    try:
        parts.append(f"{size_text(shutil.disk_usage(where).free)} free")
    except OSError:
        pass
    return OutputError(f"no space left on the device writing {what} {path}: "
                       + ", ".join(parts), hint)

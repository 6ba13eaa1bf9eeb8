"""What a prediction folder holds, so that OUT never mixes two `predict` runs.

`predict` first removes what an earlier `predict` wrote into OUT (the per-image files of the
names its predict.json lists, and the files derived from them: summary, metrics, confusion,
report): a stale ``<name>.npy`` would count in `evaluate`, a stale uncertainty map would show
in the report. Files it did not write are never touched. If the new run fails, it removes what
it wrote, so OUT holds one complete prediction or none.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .errors import OutputError

log = logging.getLogger("ddpmseg")

# Per image: the files `predict` may write for <name>.
IMAGE_SUFFIXES = (".npy", ".png", "_overlay.png", "_entropy.npy", "_jsd.npy", "_uncertainty.png")
# Once per folder: predict's own, then evaluate's and report's (derived from the predictions).
FOLDER_FILES = ("palette.json", "summary.png", "metrics.json", "confusion.csv", "confusion.png",
                "predict.json")
REPORT_DIR = "report"


def image_files(out: Path, name: str) -> list[Path]:
    return [out / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]


def clear_previous(out: Path) -> int:
    """Remove an earlier prediction from ``out``; returns how many files went."""
    meta = out / "predict.json"
    if not meta.is_file():
        return 0
    try:
        names = json.loads(meta.read_text()).get("names", [])
    except (OSError, ValueError):
        names = []
    gone = 0
    for path in [f for n in names for f in image_files(out, n)] + \
            [out / f for f in FOLDER_FILES]:
        if path.is_file():
            path.unlink()
            gone += 1
    report = out / REPORT_DIR
    if (report / "index.html").is_file():  # the HTML report `predict --report` wrote
        shutil.rmtree(report)
    if gone:
        log.info("removed the earlier prediction in %s (%d files)", out, gone)
    return gone


def check_free(out: Path, names) -> None:
    """Refuse to write over files no `predict` wrote (left after ``clear_previous``), such as
    the images of a data folder given as OUT."""
    taken = [p for n in names for p in image_files(out, n) if p.exists()]
    if taken:
        raise OutputError(f"{out} already holds {len(taken)} file(s) named like the "
                          f"predictions, which no earlier `ddpmseg predict` wrote (e.g. "
                          f"{taken[0].name})", "choose an empty or new output folder")


def remove_written(paths, created_dir: Path | None = None) -> None:
    """After a failed run: delete the files it wrote, and OUT itself when the run created it
    and it is empty again (best effort, never raises)."""
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass
    if created_dir is not None:
        try:
            created_dir.rmdir()
        except OSError:  # not empty: something else was put there meanwhile
            pass

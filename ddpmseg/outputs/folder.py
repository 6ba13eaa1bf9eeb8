"""The prediction folder: what it holds, and how `predict` replaces it whole.

This module is the folder's one schema: the file names (``IMAGE_KINDS`` per image,
``PALETTE_FILE``, ``SUMMARY_FILE``, ``METRICS_FILE``, ``CONFUSION_*``, ``REPORT_DIR``) and
predict.json's keys (``META_KEYS``). `predict` writes through it (``image_file``,
``write_meta``); `evaluate` and `report` read through it (``check_complete``, ``read_meta``,
``list_predictions``, ``uncertainty_maps``).

A finished `predict` leaves in OUT, per image ``<name>`` of its predict.json's ``names``, the
files of ``IMAGE_SUFFIXES`` (the ``_entropy``/``_jsd``/``_uncertainty`` ones with
``uncertainty``), and once ``FOLDER_FILES`` (predict.json last of all). `evaluate` and `report`
add metrics, confusion and the ``report`` folder, derived from the predictions.

`predict` never writes into OUT itself. It writes the new prediction into a hidden sibling,
``.OUT.partial-<pid>`` (same filesystem), renames it ``.OUT.new`` once whole, moves into it
what OUT holds that is no prediction's (a user's files, suggestions), then swaps it in by two
renames, OUT -> ``.OUT.old`` and ``.OUT.new`` -> OUT, and deletes ``.OUT.old``. The names say
what each folder is, so a predict killed at any point leaves OUT's earlier prediction whole (or
the new one), and the next predict, under OUT's lock, finishes what it left
(:func:`finish_interrupted`): a partial folder is deleted, a ``.new`` one is swapped in. An
earlier prediction's files are therefore never mixed with a new one's.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from pathlib import Path

from ddpmseg.core.errors import InputNotFoundError, OutputError
from ddpmseg.core.fileio import is_temporary, write_json

log = logging.getLogger(__name__)

# Per image: the files `predict` may write for <name>, by kind (the keys of predict's
# "outputs"): the label map, its palette PNG, the overlay and, with uncertainty, the maps.
IMAGE_KINDS = {"npy": ".npy", "png": ".png", "overlay": "_overlay.png",
               "entropy": "_entropy.npy", "jsd": "_jsd.npy", "uncertainty": "_uncertainty.png"}
IMAGE_SUFFIXES = tuple(IMAGE_KINDS.values())
# Per image, with --uncertainty: the maps the report reads.
UNCERTAINTY_SUFFIXES = (IMAGE_KINDS["entropy"], IMAGE_KINDS["jsd"])
# Once per folder: predict's own, then evaluate's and report's (derived from the predictions).
META_FILE = "predict.json"
PALETTE_FILE = "palette.json"
SUMMARY_FILE = "summary.png"
METRICS_FILE = "metrics.json"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
FOLDER_FILES = (PALETTE_FILE, SUMMARY_FILE, METRICS_FILE, CONFUSION_CSV, CONFUSION_PNG,
                META_FILE)
REPORT_DIR = "report"     # the report's default folder, inside the prediction folder
REPORT_INDEX = "index.html"   # the report's page, in its folder
# predict.json's keys, in the order predict writes them.
META_KEYS = ("version", "run", "input", "input_kind", "out_dir", "vote", "tile_rows",
             "uncertainty", "device", "resize", "at_model_size", "images", "checkpoint",
             "num_members",
             "num_classes", "ignore_label", "class_names", "steps", "blocks", "image_size",
             "seed", "dtype", "fingerprint", "config", "num_images", "names", "summary",
             "palette", "seconds")
_REDO = "rerun `ddpmseg predict` to write it again"
# Label-map-like files of a folder that are not label maps: the per-image extras and the
# folder's own pictures (a folder of label maps another tool wrote is read too).
_NOT_LABEL_ENDINGS = tuple(x.rsplit(".", 1)[0] for x in IMAGE_SUFFIXES if x.startswith("_"))
_NOT_LABEL_STEMS = tuple(Path(f).stem for f in (PALETTE_FILE, SUMMARY_FILE, CONFUSION_PNG))


def image_file(folder: Path, name: str, kind: str) -> Path:
    """The file of kind ``kind`` (``IMAGE_KINDS``) of image ``name`` in a prediction folder."""
    return Path(folder) / f"{name}{IMAGE_KINDS[kind]}"


def image_files(out: Path, name: str) -> list[Path]:
    return [image_file(out, name, kind) for kind in IMAGE_KINDS]


def write_meta(folder: Path, meta: dict) -> Path:
    """Write predict.json (``META_KEYS``, in that order) into ``folder``; the last file a
    `predict` writes: the prediction is whole once it is there."""
    if tuple(meta) != META_KEYS:
        raise AssertionError(f"predict.json's keys are {META_KEYS}, got {tuple(meta)}")  # a bug
    path = Path(folder) / META_FILE
    write_json(path, meta, default=str)
    return path


def read_meta(pred_dir: Path) -> dict:
    """predict.json of ``pred_dir`` as far as it can be read; {} where there is none (a folder
    of label maps another tool wrote) or it cannot be read (with a warning)."""
    path = Path(pred_dir) / META_FILE
    if path.is_file():
        try:
            meta = json.loads(path.read_text())
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            log.warning("could not read %s; ignoring it", path)
    return {}


def list_predictions(pred_dir: Path) -> dict[str, Path]:
    """name -> label-map file: the ``<name>.npy`` files, or else the label PNGs."""
    files = sorted(p for p in Path(pred_dir).iterdir() if p.is_file())

    def is_label(p: Path) -> bool:
        return not p.stem.endswith(_NOT_LABEL_ENDINGS) and p.stem not in _NOT_LABEL_STEMS

    found = {p.stem: p for p in files if p.suffix.lower() == ".npy" and is_label(p)}
    if not found:
        found = {p.stem: p for p in files if p.suffix.lower() == ".png" and is_label(p)}
    return found


def uncertainty_maps(pred_dir: Path, name: str) -> tuple[Path, Path] | None:
    """The (entropy, jsd) maps of image ``name``, when `predict --uncertainty` wrote both."""
    entropy, jsd = image_file(pred_dir, name, "entropy"), image_file(pred_dir, name, "jsd")
    return (entropy, jsd) if entropy.is_file() and jsd.is_file() else None


# -- what a finished predict left --------------------------------------------------------------

def check_complete(pred_dir: Path) -> dict:
    """predict.json of a folder a `predict` finished, after checking that the label maps (and
    with ``uncertainty`` the uncertainty maps) of every name it lists are there; else one
    error naming what is missing. Returns predict.json's contents."""
    pred_dir = Path(pred_dir)
    path = pred_dir / META_FILE
    if not path.is_file():
        raise InputNotFoundError(f"prediction folder {pred_dir} has no {META_FILE}: no "
                                 f"`ddpmseg predict` finished writing it", _REDO)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputNotFoundError(f"cannot read {path} ({exc})", _REDO) from exc
    names = meta.get("names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputNotFoundError(f"{path} lists no image names", _REDO)
    suffixes = (IMAGE_KINDS["npy"],) + (UNCERTAINTY_SUFFIXES if meta.get("uncertainty") else ())
    lacking = {n: [f"{n}{x}" for x in suffixes if not (pred_dir / f"{n}{x}").is_file()]
               for n in names}
    missing = [f for files in lacking.values() for f in files]
    if missing:
        images = sum(1 for files in lacking.values() if files)
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} files)" if len(missing) > 3
                                          else "")
        what = "label map" if suffixes == (".npy",) else "maps"
        raise InputNotFoundError(f"prediction folder {pred_dir} is incomplete: {images} of the "
                                 f"{len(names)} images {META_FILE} lists "
                                 f"{'has' if images == 1 else 'have'} no {what} ({shown})",
                                 _REDO)
    return meta


def _ours(out: Path) -> set[str]:
    """The entries of ``out`` an earlier predict (and evaluate or report after it) wrote."""
    names = []
    try:
        names = json.loads((out / META_FILE).read_text()).get("names", [])
    except (OSError, ValueError, AttributeError):
        pass
    own = {p.name for n in names if isinstance(n, str) for p in image_files(out, n)}
    own.update(FOLDER_FILES)
    if (out / REPORT_DIR / REPORT_INDEX).is_file():  # the report `predict --report` wrote
        own.add(REPORT_DIR)
    return own


def check_free(out: Path, names) -> None:
    """Refuse to replace files no `predict` wrote that clash with the new prediction's names,
    such as the images of a data folder given as OUT."""
    if not out.is_dir():
        return
    own = _ours(out)
    taken = [p for n in names for p in image_files(out, n) if p.exists() and p.name not in own]
    if taken:
        raise OutputError(f"{out} already holds {len(taken)} file(s) named like the "
                          f"predictions, which no earlier `ddpmseg predict` wrote (e.g. "
                          f"{taken[0].name})", "choose an empty or new output folder")


# -- the hidden siblings and the swap ----------------------------------------------------------

def real_out(out: Path) -> Path:
    """OUT as the swap renames it: its real path (a symlink to OUT stays one)."""
    return Path(os.path.realpath(Path(out).expanduser()))


def staging_dir(out: Path) -> Path:
    """Where this process writes a new prediction of ``out`` (a real path)."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _new(out: Path) -> Path:
    return out.parent / f".{out.name}.new"


def _old(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _move(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)


def check_replaceable(out: Path) -> None:
    """OUT must be a folder `predict` can swap out: not the current folder nor above it
    (renaming it would pull the working folder away), not a mount point."""
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise OutputError(f"output folder {out} is the current folder or holds it: predict "
                          "replaces OUT as a whole", "give a folder beside or below it")
    if out.is_dir() and os.path.ismount(out):
        raise OutputError(f"output folder {out} is a mount point: predict replaces OUT as a "
                          "whole", "give a folder inside it")


def swap_in(ready: Path, out: Path) -> None:
    """Make the whole new prediction ``ready`` (named ``.OUT.new``) OUT: carry over OUT's
    entries that are no prediction's, then OUT -> .OUT.old, .OUT.new -> OUT, delete .OUT.old."""
    if out.is_dir():
        own = _ours(out)
        carried = [p for p in out.iterdir() if p.name not in own and not is_temporary(p)]
        clash = [p.name for p in carried if (ready / p.name).exists()]
        if clash:  # checked before the run started; changed since
            raise OutputError(f"{out} holds {clash[0]}, which the new prediction also has",
                              f"move it away; the new prediction waits in {ready}")
        shutil.copymode(out, ready)
        for p in carried:
            _move(p, ready / p.name)
        _move(out, _old(out))
    _move(ready, out)
    if _old(out).exists():
        _remove_tree(_old(out))


def finish_interrupted(out: Path) -> None:
    """Under OUT's lock: delete the partial folders a killed predict left beside OUT, swap in
    a whole new prediction it left, and delete an earlier one it had swapped out."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        if p.is_dir():
            shutil.rmtree(p)
    new, old = _new(out), _old(out)
    if new.is_dir() and old.is_dir():
        # Killed between OUT -> .old and .new -> OUT (OUT may have been made anew since,
        # empty): the second rename is what is left to do.
        log.info("finishing the prediction a killed predict left in %s", new)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        _move(new, out)
    elif new.is_dir():
        log.info("finishing the prediction a killed predict left in %s", new)
        swap_in(new, out)
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old)
        else:  # nothing to swap in (no .new): restore the earlier prediction
            _move(old, out)


def publish(stage: Path, out: Path) -> None:
    """The whole new prediction in ``stage`` becomes OUT."""
    _move(stage, _new(out))
    swap_in(_new(out), out)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it is gone)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

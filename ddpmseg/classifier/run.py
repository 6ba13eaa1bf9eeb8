"""The run directory ``fit`` writes and ``predict`` reads: its one definition.

    config.json        the resolved config, without the [features] section: the features a
                       run was trained on are its store's FeatureSpec, recorded once, in
                       store.json (runs written before kept a copy here; it is ignored)
    store.json         {"path": the training store, "info": its StoreInfo (FORMAT.md),
                       "images": {name: [image sha256, mask sha256]} of the images trained on}
    member_{k:02d}.pt  {"state_dict": ..., "meta": {...}}, written atomically as each finishes
    train_log.jsonl    one line per epoch (member, epoch, loss, ce, steps, pixels/s) and one per
                       finished member (stop epoch, early stop)
    manifest.json      {"format": 1, "files": {name: sha256}} of config.json, store.json and
                       each member: checked on every load, so a flipped byte in a member or a
                       header is an error, never a silently different ensemble. A member file
                       the manifest does not list (a fit killed between writing the two) is
                       retrained. Runs written before the manifest have none and load unchecked.

A writer (``fit``, ``import-run``) holds the run dir's lock (``ddpmseg.core.locking``) for its
whole life, and writes and deletes the run's files only through this module. Importing it imports
no torch (``verify`` checks a run without it): torch is imported where members are read or
written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ddpmseg.config import Config
from ddpmseg.core.errors import RunError
from ddpmseg.core.fileio import atomic_write, remove_temporaries, sha256_file, write_json
from ddpmseg.featcache.content import image_set_changes
from ddpmseg.featcache.store import StoreInfo
from ddpmseg.spec import TOLERATED

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STORE_FILE = "store.json"
LOG_FILE = "train_log.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MEMBER_GLOB = "member_*.pt"
MEMBER_FORMAT = 1
# The files that make a folder a run (``clear`` deletes them; import-run refuses to mix with them).
RUN_FILES = (CONFIG_FILE, STORE_FILE, MEMBER_GLOB, LOG_FILE, MANIFEST_FILE)
# The classifier settings a resumed run must share with the members already trained.
# (ensemble may grow or shrink; ram_budget_gb only matters through the shuffle size.)
TRAINING_KEYS = ("lr", "pixels_per_batch", "max_epochs", "min_epochs", "patience", "etf",
                 "etf_weight", "seed")
# Store differences that do not change a single feature or label a member sees. (A lossy
# codec's rounding does: it is the spec's keepbits, compared with the rest of the spec.)
_IRRELEVANT = TOLERATED["fit"]


# How to start a run over, in fit's parameters.
RETRAIN = "retrain: fit again with `overwrite=True`"


def member_path(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"member_{k:02d}.pt"


@dataclass(frozen=True)
class RunHeader:
    """What a run records besides its members: the config and the training store."""

    config: Config       # resolved: data and features sections are the store's
    info: StoreInfo      # the training store's; ``info.spec`` is the run's FeatureSpec
    store_path: str
    images: dict | None = None   # the image set trained on, with hashes (None: older runs)


def resolved_config(config: Config, info: StoreInfo, store_model: dict | None = None) -> Config:
    """The run's config: data and feature settings are the store's, not the config file's.

    ``store_model``: the store's [model] section; when the config names no checkpoint, the
    run records the store's (and its preset), so predicting from images finds the backbone.
    """
    spec = info.spec
    if store_model and not config.model.checkpoint and store_model.get("checkpoint"):
        config = config.replace(model={k: store_model.get(k) for k in
                                              ("checkpoint", "preset", "prompt")})
    data = dataclasses.replace(config.data, num_classes=info.num_classes,
                               ignore_label=info.ignore_label,
                               class_names=tuple(info.class_names),
                               min_class_pixels=info.min_class_pixels)
    features = dataclasses.replace(config.features, steps=spec.steps, blocks=spec.blocks,
                                   seed=spec.seed, dtype=spec.dtype, precision=spec.precision)
    return dataclasses.replace(config, data=data, features=features)


def write_header(run_dir: Path, config: Config, store_path: str, info: StoreInfo,
                 images: dict | None = None) -> None:
    raw = config.to_dict()
    raw.pop("features")  # the store's spec, in store.json
    write_json(Path(run_dir) / CONFIG_FILE, raw)
    store = {"path": str(store_path), "info": info.to_json()}
    if images is not None:
        store["images"] = images
    write_json(Path(run_dir) / STORE_FILE, store)
    record_files(run_dir, [CONFIG_FILE, STORE_FILE])


# -- the manifest -------------------------------------------------------------------------

def read_manifest(run_dir: str | Path) -> dict[str, str] | None:
    """{file name: sha256}, or None for a run written before manifests existed."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path} is damaged ({type(exc).__name__}: {exc})", RETRAIN) from exc
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise RunError(f"{path} is damaged (files is not a {{name: sha256}} object)", RETRAIN)
    return dict(files)


def record_files(run_dir: str | Path, names, forget=()) -> None:
    """Put the sha256 of each of ``names`` (files in run_dir) into the manifest."""
    run_dir = Path(run_dir)
    files = read_manifest(run_dir) or {}
    for name in forget:
        files.pop(name, None)
    for name in names:
        files[name] = sha256_file(run_dir / name)
    write_json(run_dir / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files})


def check_file(path: Path, manifest: dict[str, str] | None) -> None:
    """RunError unless ``path`` has the sha256 the manifest records (None: not checked)."""
    if manifest is None:
        return
    want = manifest.get(path.name)
    if want is None:
        raise RunError(f"{path} is not recorded in {MANIFEST_FILE} (written by an interrupted "
                       "fit, or copied in)", "rerun the same fit to retrain it")
    if sha256_file(path) != want:
        raise RunError(f"{path} does not match its checksum in {MANIFEST_FILE}: it was "
                       "damaged or changed after fit wrote it",
                       "delete it and rerun the same fit to retrain it"
                       if path.suffix == ".pt" else RETRAIN)


def read_header(run_dir: str | Path) -> RunHeader:
    run_dir = Path(run_dir)
    cfg_path, store_path = run_dir / CONFIG_FILE, run_dir / STORE_FILE
    if not cfg_path.is_file() or not store_path.is_file():
        raise RunError(f"{run_dir} is not a ddpmseg run directory (no {CONFIG_FILE}/"
                       f"{STORE_FILE})", "train one with fit")
    manifest = read_manifest(run_dir)
    for path in (cfg_path, store_path):
        check_file(path, manifest)
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        raw_store = json.loads(store_path.read_text())
        info = StoreInfo.from_json(raw_store["info"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{run_dir}: {CONFIG_FILE} or {STORE_FILE} is unreadable ({exc})",
                       RETRAIN) from exc
    config = Config.from_dict(raw_cfg, source=str(cfg_path))
    return RunHeader(resolved_config(config, info), info, raw_store.get("path", ""),
                     raw_store.get("images"))


def read_member(path: Path, check: bool = True) -> dict:
    """A member file's contents, after checking it against the run's manifest."""
    import torch  # here: reading a run's header needs no torch

    if check:
        check_file(path, read_manifest(path.parent))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise RunError(f"{path} is unreadable ({type(exc).__name__}: {exc})",
                       "delete it and rerun fit to retrain that member") from exc


def write_member(run_dir: Path, k: int, state: dict, meta: dict) -> Path:
    # Serialised in memory first (a member is a few MB): torch.save writing to a full disk
    # fails with "[enforce fail at inline_container.cc]", a plain write with ENOSPC, which
    # fit reports in one line naming the run dir and the free space.
    import torch  # here: reading a run's header needs no torch

    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buffer)
    path = atomic_write(member_path(run_dir, k), lambda p: p.write_bytes(buffer.getbuffer()))
    record_files(run_dir, [path.name])
    return path


def trained_members(run_dir: Path, count: int) -> list[int]:
    """Which of members 0..count-1 are trained: present and recorded in the manifest."""
    manifest = read_manifest(run_dir)
    return [k for k in range(count) if member_path(run_dir, k).is_file()
            and (manifest is None or member_path(run_dir, k).name in manifest)]


def remove_leftovers(run_dir: Path, unrecorded: bool = True) -> None:
    """Delete what a killed fit left: temporary files, and (``unrecorded``) member files the
    manifest does not list (killed between writing the member and recording it: it is
    retrained)."""
    remove_temporaries(run_dir)
    manifest = read_manifest(run_dir) if unrecorded else None
    if manifest is not None:
        for p in run_dir.glob(MEMBER_GLOB):
            if p.name not in manifest:
                p.unlink(missing_ok=True)


def run_files(run_dir: Path) -> list[Path]:
    """The files in ``run_dir`` that belong to a run (``RUN_FILES``)."""
    return [p for pattern in RUN_FILES for p in sorted(Path(run_dir).glob(pattern))]


def clear(run_dir: Path) -> None:
    """Delete the run in ``run_dir`` (its files and any temporary ones), keeping the folder and
    whatever else it holds: the start of ``fit(overwrite=True)`` and of import-run."""
    remove_temporaries(run_dir)
    for p in run_files(run_dir):
        p.unlink(missing_ok=True)


def append_log(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare(run_dir: Path, cfg: Config, info: StoreInfo, resume: bool, shuffle: int,
            images: dict | None = None) -> None:
    """Make ``run_dir`` ready for ``fit``: emptied (``resume`` False), or checked that the
    members in it were trained on the same features, labels and settings (and, ``images``,
    the same image set: a store that grew or changed since is never silently mixed in)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run dir {run_dir} is a file", "choose another path")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear(run_dir)
        return
    remove_leftovers(run_dir)
    members = sorted(run_dir.glob(MEMBER_GLOB))
    if not members:
        # Nothing trained yet: a header left by a killed fit (even a damaged one) is rewritten.
        return
    hint = f"use a new run dir, or `overwrite=True` to replace {run_dir}"
    if (run_dir / STORE_FILE).is_file():
        old = read_header(run_dir)
        ignore = _IRRELEVANT
        if images is not None and old.images is not None:
            changes = image_set_changes(old.images, images)
            if changes:
                raise RunError(f"run dir {run_dir} was trained on an earlier state of the store "
                               f"{old.store_path}: since then " + "; ".join(changes), hint)
            ignore = _IRRELEVANT + ("names",)  # same set; store order may differ (compact)
        diffs = info.differences(old.info, "now", "in the run's store", ignore=ignore)
        if diffs:
            raise RunError(f"run dir {run_dir} was trained on another store "
                           f"({old.store_path}): it differs in " + "; ".join(diffs), hint)
        if members:
            old_c, new_c = old.config.classifier, cfg.classifier
            diffs = [f"{k} ({getattr(old_c, k)!r} there, {getattr(new_c, k)!r} now)"
                     for k in TRAINING_KEYS if getattr(old_c, k) != getattr(new_c, k)]
            if diffs:
                raise RunError(f"run dir {run_dir} was trained with other classifier "
                               "settings: " + "; ".join(diffs),
                               f"rerun with the same options to resume, or {hint}")
            if old_c.ram_budget_gb != new_c.ram_budget_gb:
                # Allowed when it shuffles as many images together (checked below): say so.
                log.warning(
                    "note: ram_budget_gb is %s now, %s when the run started; resuming, since it "
                    "shuffles %s images together either way", new_c.ram_budget_gb,
                    old_c.ram_budget_gb, shuffle)
    elif members:
        raise RunError(f"run dir {run_dir} holds member files but no {STORE_FILE}", hint)
    if members and read_manifest(run_dir) is None:
        # A run written before manifests: its members (checked below) are adopted as they are.
        record_files(run_dir, [p.name for p in members])
    for p in members:
        meta = read_member(p).get("meta", {})
        if meta.get("shuffle_images") != shuffle:
            raise RunError(
                f"{p.name} was trained shuffling {meta.get('shuffle_images')} images at a time; "
                f"with this RAM budget it would be {shuffle}, and the remaining members would "
                "not match an uninterrupted run",
                f"rerun with the first run's `ram_budget_gb=GB`, or {hint}")

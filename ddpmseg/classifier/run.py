"""The run directory ``fit`` writes and ``predict`` reads: its one definition.

    config.json        the resolved config, without the [features] section: the features a
                       run was trained on are its store's FeatureSpec, recorded once, in
                       store.json (runs written before kept a copy here; it is ignored)
    store.json         {"path": the training store, "info": its StoreInfo (FORMAT.md)}
    member_{k:02d}.pt  {"state_dict": ..., "meta": {...}}, written atomically as each finishes
    train_log.jsonl    one line per epoch (member, epoch, loss, ce, steps, pixels/s) and one per
                       finished member (stop epoch, early stop)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import RunError
from ..featcache.store import StoreInfo
from ..fileio import atomic_write, write_json

CONFIG_FILE = "config.json"
STORE_FILE = "store.json"
LOG_FILE = "train_log.jsonl"
MEMBER_GLOB = "member_*.pt"
MEMBER_FORMAT = 1
# The classifier settings a resumed run must share with the members already trained.
# (ensemble may grow or shrink; ram_budget_gb only matters through the shuffle size.)
TRAINING_KEYS = ("lr", "batch_size", "max_epochs", "min_epochs", "patience", "etf",
                 "etf_weight", "seed")
# Store differences that do not change a single feature or label a member sees.
_IRRELEVANT = ("codec", "format_version")


def member_path(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"member_{k:02d}.pt"


@dataclass(frozen=True)
class RunHeader:
    """What a run records besides its members: the config and the training store."""

    config: Config       # resolved: data and features sections are the store's
    info: StoreInfo      # the training store's; ``info.spec`` is the run's FeatureSpec
    store_path: str


def resolved_config(config: Config, info: StoreInfo, store_model: dict | None = None) -> Config:
    """The run's config: data and feature settings are the store's, not the config file's.

    ``store_model``: the store's [model] section; when the config names no checkpoint, the
    run records the store's (and its preset), so predicting from images finds the backbone.
    """
    spec = info.spec
    if store_model and not config.model.checkpoint and store_model.get("checkpoint"):
        config = config.with_overrides(model={k: store_model.get(k) for k in
                                              ("checkpoint", "preset", "prompt")})
    data = dataclasses.replace(config.data, num_classes=info.num_classes,
                               ignore_label=info.ignore_label,
                               class_names=tuple(info.class_names),
                               min_class_pixels=info.min_class_pixels)
    features = dataclasses.replace(config.features, steps=spec.steps, blocks=spec.blocks,
                                   seed=spec.seed, dtype=spec.dtype, precision=spec.precision)
    return dataclasses.replace(config, data=data, features=features)


def write_header(run_dir: Path, config: Config, store_path: str, info: StoreInfo) -> None:
    raw = config.to_dict()
    raw.pop("features")  # the store's spec, in store.json
    write_json(Path(run_dir) / CONFIG_FILE, raw)
    write_json(Path(run_dir) / STORE_FILE, {"path": str(store_path), "info": info.to_json()})


def read_header(run_dir: str | Path) -> RunHeader:
    run_dir = Path(run_dir)
    cfg_path, store_path = run_dir / CONFIG_FILE, run_dir / STORE_FILE
    if not cfg_path.is_file() or not store_path.is_file():
        raise RunError(f"{run_dir} is not a ddpmseg run directory (no {CONFIG_FILE}/"
                       f"{STORE_FILE})", "train one with `ddpmseg fit STORE RUN_DIR`")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        raw_store = json.loads(store_path.read_text())
        info = StoreInfo.from_json(raw_store["info"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{run_dir}: {CONFIG_FILE} or {STORE_FILE} is unreadable ({exc})",
                       "retrain: `ddpmseg fit ... --overwrite`") from exc
    config = Config.from_dict(raw_cfg, source=str(cfg_path))
    return RunHeader(resolved_config(config, info), info, raw_store.get("path", ""))


def read_member(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise RunError(f"{path} is unreadable ({type(exc).__name__}: {exc})",
                       "delete it and rerun `ddpmseg fit` to retrain that member") from exc


def write_member(run_dir: Path, k: int, state: dict, meta: dict) -> Path:
    return atomic_write(member_path(run_dir, k),
                        lambda p: torch.save({"state_dict": state, "meta": meta}, p))


def append_log(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare(run_dir: Path, cfg: Config, info: StoreInfo, resume: bool, shuffle: int) -> None:
    """Make ``run_dir`` ready for ``fit``: emptied (``resume`` False), or checked that the
    members in it were trained on the same features, labels and settings."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run dir {run_dir} is a file", "choose another path")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for p in list(run_dir.glob(MEMBER_GLOB)) + [run_dir / LOG_FILE, run_dir / CONFIG_FILE,
                                                     run_dir / STORE_FILE]:
            p.unlink(missing_ok=True)
        return
    members = sorted(run_dir.glob(MEMBER_GLOB))
    hint = f"use a new run dir, or --overwrite to replace {run_dir}"
    if (run_dir / STORE_FILE).is_file():
        old = read_header(run_dir)
        diffs = info.differences(old.info, "now", "in the run's store", ignore=_IRRELEVANT)
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
                logging.getLogger("ddpmseg").warning(
                    "note: ram_budget_gb is %s now, %s when the run started; resuming, since it "
                    "shuffles %s images together either way", new_c.ram_budget_gb,
                    old_c.ram_budget_gb, shuffle)
    elif members:
        raise RunError(f"run dir {run_dir} holds member files but no {STORE_FILE}", hint)
    for p in members:
        meta = read_member(p).get("meta", {})
        if meta.get("shuffle_images") != shuffle:
            raise RunError(
                f"{p.name} was trained shuffling {meta.get('shuffle_images')} images at a time; "
                f"with this RAM budget it would be {shuffle}, and the remaining members would "
                "not match an uninterrupted run",
                f"rerun with the --ram-budget-gb of the first run, or {hint}")

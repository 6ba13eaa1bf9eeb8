"""Runs in the reference's own format (ddpm-segmentation's ``pixel_classifiers``), in and out.

The reference saves each member as ``model_{i}.pth`` =
``torch.save({"model_state_dict": nn.DataParallel(pixel_classifier).state_dict()})``: keys
``module.layers.{0,2,3,5,6}.*``. ``PixelMLP`` has the same module layout, so a member moves
between the two tools by adding or stripping the ``module.`` prefix, bit for bit.

- ``import_run(ref_dir, run_dir, config)``: model_{i}.pth files + the config of their ddpm.json
  -> a ddpmseg run directory (default vote hard, as the reference predicts).
- ``export_run(run_dir, out_dir)``: a ddpmseg run -> ``out_dir/ddpm.json`` +
  ``out_dir/pixel_classifiers/<steps>_<blocks>/model_{i}.pth`` (the reference appends that
  sub-folder to its exp_dir), which the reference's ``load_ensemble`` reads.

Where the run directory's layout is touched: ``_write_run`` and ``_read_run`` only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ddpmseg.config import Config
from ddpmseg.data import size_text
from ddpmseg.core.errors import ConfigError, InputNotFoundError, RunError
from ddpmseg.backbone import Backbone, ModelFlags
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import StoreInfo
from ddpmseg.core.fileio import atomic_write
from ddpmseg.core.locking import writer_lock
from ddpmseg.interop.reference_config import to_reference_json
from ddpmseg.classifier.model import PixelMLP, hidden_widths
from ddpmseg.classifier.ensemble import load_ensemble
from ddpmseg.classifier.run import RUN_FILES, clear, resolved_config, write_header, write_member

log = logging.getLogger(__name__)

FORMATS = ("reference",)
PREFIX = "module."
STATE_KEY = "model_state_dict"
EXPORT_SUBDIR = "pixel_classifiers"


def reference_member_path(ref_dir: str | Path, i: int) -> Path:
    return Path(ref_dir) / f"model_{i}.pth"


def experiment_suffix(steps, blocks) -> str:
    """The sub-folder the reference appends to exp_dir: ``50_150_250_5_6_7_8_12``."""
    return "_".join(str(v) for v in (*steps, *blocks))


def _members_folder(ref_dir: Path, steps, blocks) -> Path:
    """Where the model_{i}.pth are: REF_DIR itself, the reference's ``exp_dir/<steps>_<blocks>``
    below it, or ``pixel_classifiers/<steps>_<blocks>`` below the folder ``export_run`` wrote."""
    suffix = experiment_suffix(steps, blocks)
    for folder in (ref_dir, ref_dir / suffix, ref_dir / EXPORT_SUBDIR / suffix):
        if reference_member_path(folder, 0).is_file():
            return folder
    return ref_dir


# -- reading the reference's members -----------------------------------------------------------
def read_reference_member(path: str | Path, dim: int, num_classes: int) -> dict:
    """One ``model_{i}.pth`` -> a PixelMLP state dict (no prefix), checked against ``dim`` and
    ``num_classes``. Any other layout is a RunError naming the file."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{path} does not exist",
                                 "give the folder of the reference's model_{i}.pth") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise RunError(f"{path} is not a readable torch file ({type(exc).__name__})",
                       "give the reference's model_{i}.pth files") from exc
    state = saved.get(STATE_KEY, saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise RunError(f"{path} holds no state dict of tensors (expected "
                       f"{{'{STATE_KEY}': state_dict}})",
                       "give the reference's pixel_classifier files")
    if all(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items()}
    expected = PixelMLP(dim, num_classes, init=False).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if part)
        raise RunError(f"{path} is not a reference pixel_classifier for {num_classes} classes "
                       f"({detail})", "check number_class in the ddpm.json and the file")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape) or state[key].dtype != ref.dtype:
            raise RunError(f"{path}: {key} is {tuple(state[key].shape)} {state[key].dtype}, a "
                           f"classifier of {dim} features and {num_classes} classes has "
                           f"{tuple(ref.shape)} {ref.dtype}",
                           "check dim and number_class in the ddpm.json")
    return {k: state[k] for k in expected}


# -- import -------------------------------------------------------------------------------------
def import_run(ref_dir, run_dir, config: Config, *, overwrite: bool = False) -> Path:
    """The reference's ``model_{i}.pth`` (i < config.classifier.ensemble) in ``ref_dir`` ->
    a ddpmseg run in ``run_dir``. ``config`` is usually ``load_config("ddpm.json")``; its
    checkpoint is loaded (strictly, into its model flags) for the run's fingerprint and
    feature shapes. Everything is checked before the first byte is written, under the run
    dir's writer lock (as fit holds it)."""
    with writer_lock(Path(run_dir), "run dir"):
        return _import_run(Path(ref_dir), Path(run_dir), config, overwrite)


def _import_run(ref_dir: Path, run_dir: Path, config: Config, overwrite: bool) -> Path:
    if not ref_dir.is_dir():
        raise InputNotFoundError(f"{ref_dir} is not a folder",
                                 "give the folder holding the reference's model_{i}.pth")
    _check_target(run_dir, overwrite, RUN_FILES, "run dir")
    if not config.model.checkpoint:
        raise ConfigError("the config names no checkpoint",
                          "give the ddpm.json (model_path) the classifiers were trained with")
    ref_dir = _members_folder(ref_dir, config.features.steps, config.features.blocks)
    k_total = config.classifier.ensemble
    missing = [reference_member_path(ref_dir, i).name for i in range(k_total)
               if not reference_member_path(ref_dir, i).is_file()]
    if missing:
        raise InputNotFoundError(f"{ref_dir}: {len(missing)} of {k_total} members missing "
                                 f"(e.g. {missing[0]})",
                                 "give the folder of the model_{i}.pth files (or the one "
                                 "above its <steps>_<blocks> or pixel_classifiers/ folder) "
                                 "and check model_num in the ddpm.json")

    # Loaded (on the CPU: only its hash and shapes are needed) to prove it fits its flags.
    backbone = Backbone.from_checkpoint(config.model.checkpoint,
                                        ModelFlags.resolve(config.model.preset), device="cpu")
    size = backbone.flags.image_size
    # The reference keeps float32 features computed in float32.
    spec = FeatureSpec.of_backbone(backbone, config.features.steps, config.features.blocks,
                                   (size, size), seed=config.features.seed, dtype="float32",
                                   precision="fp32")
    info = StoreInfo(spec, num_images=0, names=(),
                     num_classes=config.data.num_classes, ignore_label=config.data.ignore_label,
                     class_names=tuple(config.data.class_names), has_labels=True,
                     min_class_pixels=config.data.min_class_pixels)
    del backbone

    states = [read_reference_member(reference_member_path(ref_dir, i), info.feature_dim,
                                    info.num_classes) for i in range(k_total)]
    # The reference trains without a regulariser and predicts by majority.
    config = dataclasses.replace(
        config, classifier=dataclasses.replace(config.classifier, etf="none"),
        predict=dataclasses.replace(config.predict, vote="hard"))
    cfg = resolved_config(config, info)
    metas = [{"member": i, "dim": info.feature_dim, "num_classes": info.num_classes,
              "widths": list(hidden_widths(info.num_classes)), "etf": "none",
              "source": "reference", "file": str(reference_member_path(ref_dir, i).resolve())}
             for i in range(k_total)]
    _write_run(run_dir, cfg, info, states, metas, source=str(ref_dir.resolve()))
    log.info("imported %d reference members from %s into %s (%d features, %d classes)",
             k_total, ref_dir, run_dir, info.feature_dim, info.num_classes)
    return run_dir


# -- export -------------------------------------------------------------------------------------
def export_run(run_dir, out_dir, *, format: str = "reference", overwrite: bool = False) -> Path:
    """A ddpmseg run -> ``out_dir/ddpm.json`` + ``out_dir/pixel_classifiers/<steps>_<blocks>/
    model_{i}.pth``.

    The ddpm.json names the checkpoint and the member folder by absolute path, so the
    reference's scripts find them from any working directory; the UNet's flags go under
    ``model_flags`` (the reference takes them on its command line). The ETF head, which
    prediction never uses, is not part of the reference's files: said on stderr.
    Returns the ddpm.json path.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}", f"use one of {', '.join(FORMATS)}")
    with writer_lock(Path(out_dir), "export folder"):
        return _export_run(run_dir, Path(out_dir), overwrite)


def _export_run(run_dir, out_dir: Path, overwrite: bool) -> Path:
    cfg, info, states = _read_run(run_dir)
    _check_target(out_dir, overwrite, ("ddpm.json", f"{EXPORT_SUBDIR}/*/model_*.pth"), "output")
    if tuple(info.image_size)[0] != tuple(info.image_size)[1]:
        raise RunError(f"{run_dir} was trained on {size_text(info.image_size)} "
                       "images; the reference's models are square", "keep it in ddpmseg")
    checkpoint = _checkpoint_path(cfg)
    if cfg.classifier.etf != "none":
        log.warning("export: the run's ETF regulariser (%s) is dropped: the reference has none "
                    "and prediction does not use it", cfg.classifier.etf)
    if cfg.predict.vote != "hard":
        log.warning("export: the run predicts by %s vote, the reference by hard (majority) "
                    "vote: its masks may differ in a few pixels", cfg.predict.vote)
    if info.dtype != "float32":
        log.warning("export: the run was trained on %s features, the reference computes "
                    "float32 ones: its masks may differ in a few pixels", info.dtype)
    if info.seed != 0:
        log.warning("export: the run's features use noise seed %d: run the reference with "
                    "--seed %d", info.seed, info.seed)
    exp_dir = out_dir / EXPORT_SUBDIR
    # The reference reads its members from exp_dir/<steps>_<blocks>/.
    members_dir = exp_dir / experiment_suffix(info.steps, info.blocks)
    raw = to_reference_json(
        cfg, image_size=info.image_size, feature_dim=info.feature_dim,
        exp_dir=str(exp_dir.resolve()), model_path=str(checkpoint),
        flags=info.fingerprint.get("flags", {}),
        # The reference takes every image of its folders for a count <= 0.
        training_number=len(info.names) or -1, testing_number=-1)
    members_dir.mkdir(parents=True, exist_ok=True)
    for i, state in enumerate(states):
        wrapped = {PREFIX + k: v for k, v in state.items()}
        atomic_write(reference_member_path(members_dir, i),
                      lambda p, w=wrapped: torch.save({STATE_KEY: w}, p))
    atomic_write(out_dir / "ddpm.json",
                  lambda p: p.write_text(json.dumps(raw, indent=2) + "\n"))
    log.info("exported %d members of %s to %s", len(states), run_dir, out_dir)
    return out_dir / "ddpm.json"


# -- the run directory (written and deleted by run.py's functions only) ------------------------
def _write_run(run_dir: Path, cfg: Config, info: StoreInfo, states: list[dict],
               metas: list[dict], source: str) -> None:
    """Write a complete run with fit's own run-format helpers: any run there is cleared, then
    the members are written, then the header (config.json and store.json), which makes the
    directory a run (a failed write leaves no loadable run). The training store is the
    reference folder ``source``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    clear(run_dir)
    for k, (state, meta) in enumerate(zip(states, metas)):
        write_member(run_dir, k, state, meta)
    write_header(run_dir, cfg, f"imported from {source}", info)


def _read_run(run_dir) -> tuple[Config, StoreInfo, list[dict]]:
    """(config, training StoreInfo, member state dicts on the CPU) of a ddpmseg run."""
    ens = load_ensemble(run_dir, "cpu")
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in ens.members]
    return ens.config, ens.info, states


# -- helpers ------------------------------------------------------------------------------------
def _check_target(path: Path, overwrite: bool, patterns: tuple[str, ...], what: str) -> None:
    if path.exists() and not path.is_dir():
        raise RunError(f"{what} {path} is a file", "choose a folder")
    if overwrite or not path.is_dir():
        return
    taken = [p for pattern in patterns for p in path.glob(pattern)]
    if taken:
        raise RunError(f"{what} {path} already holds {taken[0].name}",
                       "choose an empty folder, or `overwrite=True`")


def _checkpoint_path(cfg: Config) -> Path:
    if not cfg.model.checkpoint:
        raise RunError("the run's config names no checkpoint",
                       "the reference needs model_path: extract again with "
                       "`checkpoint=PATH` and retrain")
    return resolve_checkpoint(cfg.model.checkpoint).expanduser().resolve()


__all__ = ["import_run", "export_run", "read_reference_member", "reference_member_path",
           "FORMATS"]

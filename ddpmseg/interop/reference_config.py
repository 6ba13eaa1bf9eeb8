"""The reference's experiment config (ddpm-segmentation's ``experiments/<set>/ddpm.json``) as a
ddpmseg ``Config``, and back.

Key mapping (reference -> ddpmseg):

    category -> data.name            number_class -> data.num_classes
    ignore_label -> data.ignore_label
    training_path -> data.train_dir  testing_path -> data.test_dir  (defaults for data folders)
    model_path -> model.checkpoint   (relative to the JSON's folder, or absolute; a relative
                                      path found only from the working directory, as the
                                      reference's own configs mean it, is taken from there)
    steps, blocks -> features.steps, features.blocks (noise seed 0, as the reference's default)
    model_num -> classifier.ensemble batch_size -> classifier.pixels_per_batch
    class_names -> data.class_names  (not the reference's: export-run writes it, and the
                                      reference ignores it)
    dim [H, W, D]: checked against the backbone's image size and the feature width of the
    steps and blocks, never copied (ddpmseg derives both).

A ddpm.json describes the reference's method, so it also sets ``classifier.etf = "none"`` and
``predict.vote = "hard"``. The reference reads the UNet's flags from its command line, not
from the JSON: they come from a ``model_flags`` entry of the JSON (``export-run`` writes one),
else from a flags JSON beside the checkpoint (``<checkpoint stem>.json``), else ``preset``,
else the 256px LSUN/FFHQ architecture when dim says 256x256 (all the reference's checkpoints).
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path

from ddpmseg.config import Config, load_toml
from ddpmseg.core.errors import ConfigError, InputNotFoundError
from ddpmseg.spec import check_blocks, check_steps

log = logging.getLogger(__name__)

# Settings whose other values give features that ddpmseg does not compute.
_MUST_BE = {"upsample_mode": "bilinear", "share_noise": True, "input_activations": False}
_REQUIRED = ("number_class", "dim", "steps", "blocks", "model_path")
# Every key the reference's configs hold (some change nothing here), and our model_flags and
# class_names (export-run writes them; the reference ignores keys it does not use).
_KNOWN = ("exp_dir", "model_type", "max_training", "training_number", "testing_number",
          "seed", "category", "training_path", "validation_path", "testing_path",
          "ignore_label", "model_num", "batch_size", "model_flags", "class_names") + \
    tuple(_MUST_BE) + _REQUIRED
_DEFAULT_256_PRESET = "lsun_256"


def is_reference_config(path: str | Path) -> bool:
    """A ``.json`` config is the reference's format (ours are TOML)."""
    return Path(path).suffix.lower() == ".json"


def read_reference_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"config {path} not found", "give the ddpm.json path") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})", "fix the file") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a ddpm.json holds one JSON object", "fix the file")
    return raw


def load_config(path: str | Path | None = None, preset: str | None = None) -> Config:
    """Read a config: a ddpmseg TOML file or the name of a bundled one (``ffhq_34``), or the
    reference's ``ddpm.json`` (``preset`` names its UNet flags when no flags file says); None =
    the defaults."""
    if path is not None and is_reference_config(path):
        return load_reference_config(path, preset)
    return load_toml(path)


def load_reference_config(path: str | Path, preset: str | None = None) -> Config:
    """A reference ``ddpm.json`` -> Config (see the module docstring for the mapping)."""
    path = Path(path)
    raw = read_reference_json(path)
    where = str(path)
    _check_keys(raw, where)
    base = path.resolve().parent
    checkpoint = _resolve_path(_string(raw, "model_path", where), base)
    steps = _ints(raw, "steps", where)
    blocks = _ints(raw, "blocks", where)
    num_classes = _int(raw, "number_class", where)
    dim = _ints(raw, "dim", where)
    if len(dim) != 3:
        raise ConfigError(f"{where}: dim must be [height, width, feature dim], got {dim}",
                          "e.g. [256, 256, 8448]")
    flags_source = _flags_source(raw, path, checkpoint, preset, dim)
    check_dim(dim, flags_source, steps, blocks, where)

    raw_data = {"name": raw.get("category", "custom"), "num_classes": num_classes}
    if "ignore_label" in raw:
        raw_data["ignore_label"] = _int(raw, "ignore_label", where)
    if "class_names" in raw:
        raw_data["class_names"] = _names(raw, num_classes, where)
    for ours, theirs in (("train_dir", "training_path"), ("test_dir", "testing_path")):
        if raw.get(theirs):
            raw_data[ours] = str(_resolve_path(_string(raw, theirs, where), base))
    classifier = {"etf": "none"}
    if "model_num" in raw:
        classifier["ensemble"] = _int(raw, "model_num", where)
    if "batch_size" in raw:
        classifier["pixels_per_batch"] = _int(raw, "batch_size", where)
    return Config.from_dict({
        "data": raw_data,
        "model": {"preset": flags_source, "checkpoint": str(checkpoint)},
        "features": {"steps": list(steps), "blocks": list(blocks), "seed": 0},
        "classifier": classifier,
        "predict": {"vote": "hard"},
    }, source=where)


def _check_keys(raw: dict, where: str) -> None:
    """The keys every ddpm.json needs, and the settings whose other values give features
    ddpmseg does not compute; unknown keys are ignored with a warning."""
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}",
                          "a reference ddpm.json names number_class, dim, steps, blocks and "
                          "model_path")
    if raw.get("model_type", "ddpm") != "ddpm":
        raise ConfigError(f"{where}: model_type {raw['model_type']!r} is not supported",
                          "only the reference's ddpm features can be imported")
    if "share_noise" not in raw:
        # The reference tests for the key, not its value: without it every image gets new noise.
        raise ConfigError(f"{where}: no share_noise key, so the reference drew new noise for "
                          "every image: features ddpmseg does not compute",
                          'add "share_noise": true (and retrain in the reference)')
    for key, wanted in _MUST_BE.items():
        if key in raw and raw[key] != wanted:
            raise ConfigError(f"{where}: {key} {json.dumps(raw[key])} gives features ddpmseg "
                              "does not compute",
                              f"use {json.dumps(wanted)} (and retrain in the reference) or "
                              "start from a ddpmseg config")
    unknown = sorted(set(raw) - set(_KNOWN))
    if unknown:
        log.warning("%s: ignoring keys the reference does not define: %s", where,
                    ", ".join(unknown))


def check_dim(dim, flags_source: str, steps, blocks, where: str) -> None:
    """``dim`` = [H, W, D] must be the backbone's image size and its feature width for these
    steps and blocks (read from the architecture on the meta device: no weights needed)."""
    import torch

    from ddpmseg.backbone import ModelFlags, UNetModel
    from ddpmseg.data import size_text

    flags = ModelFlags.resolve(flags_source)
    height, width, feat = dim
    if (height, width) != (flags.image_size, flags.image_size):
        raise ConfigError(f"{where}: dim {list(dim)} says {size_text((height, width))} images, the backbone "
                          f"({flags_source}) takes {flags.image_size}x{flags.image_size}",
                          "fix dim or the model flags")
    with torch.device("meta"):
        unet = UNetModel.from_flags(flags)
    check_steps(steps, flags.diffusion_steps, where=where, hint="fix steps")
    check_blocks(blocks, len(unet.decoder_shapes), names=False, where=where, hint="fix blocks")
    expected = len(steps) * sum(unet.decoder_shapes[b][0] for b in blocks)
    if feat != expected:
        raise ConfigError(f"{where}: dim says {feat} features per pixel, {len(steps)} steps x "
                          f"blocks {list(blocks)} of this backbone give {expected}",
                          "fix dim, steps or blocks")


def _flags_source(raw: dict, path: Path, checkpoint: Path, preset: str | None, dim) -> str:
    if isinstance(raw.get("model_flags"), dict):
        return str(path.resolve())
    beside = checkpoint.with_suffix(".json")
    if beside.is_file():
        return str(beside)
    if preset:
        return preset
    if list(dim[:2]) == [256, 256]:
        return _DEFAULT_256_PRESET
    from ddpmseg.data import size_text  # here: reading a config needs no torch
    raise ConfigError(f"{path}: cannot tell the UNet's flags for {size_text(dim[:2])} images",
                      f"put them in {beside.name} beside the checkpoint (as "
                      "guided-diffusion's flag dict) or give `preset=NAME`")


def _resolve_path(value: str, base: Path) -> Path:
    """Relative to the JSON's folder; failing that, to the working directory, which is what
    the reference's own configs mean (they are run from its repository root)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = (base / p).resolve()
    if not beside.exists() and p.exists():
        return p.resolve()
    return beside


def _string(raw: dict, key: str, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path string, got {value!r}", "fix the value")
    return value


def _int(raw: dict, key: str, where: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}", "fix the value")
    return int(value)


def _ints(raw: dict, key: str, where: str) -> tuple[int, ...]:
    value = raw[key]
    if not isinstance(value, list) or not value or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of integers, got {value!r}",
                          "fix the value")
    return tuple(int(v) for v in value)


def _names(raw: dict, num_classes: int, where: str) -> list[str]:
    value = raw["class_names"]
    if not isinstance(value, list) or len(value) != num_classes or not all(
            isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: class_names must be a list of {num_classes} strings "
                          f"(number_class), got {value!r}", "fix or remove class_names")
    return list(value)


def to_reference_json(config: Config, *, image_size, feature_dim: int, exp_dir: str,
                      model_path: str, flags: dict, training_number: int,
                      testing_number: int) -> dict:
    """A Config -> the reference's ddpm.json dict (plus ``model_flags`` and ``class_names``,
    which the reference ignores and ``load_reference_config`` reads back)."""
    d = config.data
    height, width = image_size
    extra = {"class_names": list(d.class_names)} if d.class_names else {}
    return {
        "exp_dir": exp_dir,
        "model_type": "ddpm",
        "category": d.name,
        "number_class": d.num_classes,
        "ignore_label": d.ignore_label,
        "training_path": d.train_dir,
        "testing_path": d.test_dir,
        "model_path": model_path,
        "dim": [int(height), int(width), int(feature_dim)],
        "steps": list(config.features.steps),
        "blocks": list(config.features.blocks),
        "model_num": config.classifier.ensemble,
        "max_training": training_number,
        "training_number": training_number,
        "testing_number": testing_number,
        "batch_size": config.classifier.pixels_per_batch,
        "upsample_mode": "bilinear",
        "share_noise": True,
        "input_activations": False,
        "model_flags": dict(flags),
        **extra,
    }


__all__ = ["is_reference_config", "load_reference_config", "to_reference_json", "check_dim",
           "read_reference_json"]

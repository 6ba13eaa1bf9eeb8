"""Run configuration: TOML files read into frozen dataclasses.

A config has five sections, each a frozen dataclass with the reference's values as defaults:
``[data]``, ``[model]``, ``[features]``, ``[classifier]`` and ``[predict]``. Command-line options
override single keys (``Config.replace``); every run writes the resolved config as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ddpmseg.core.errors import ConfigError, InputNotFoundError
from ddpmseg.core.fileio import write_json
from ddpmseg.spec import check_blocks, check_steps

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ETF_MODES = ("shared", "separate", "none")
# The ways the members' outputs combine (voting.py implements them).
VOTES = ("soft", "log", "hard")


@dataclass(frozen=True)
class DataConfig:
    name: str = "custom"
    num_classes: int = 2
    ignore_label: int = 255
    class_names: tuple[str, ...] = ()
    # Per image, a class covering fewer pixels than this becomes the ignore label (reference: 20).
    min_class_pixels: int = 20
    # Default data folders of commands that take one (a reference ddpm.json's
    # training_path / testing_path); "" = none.
    train_dir: str = ""
    test_dir: str = ""

    def __post_init__(self):
        _check_values(self, "data")

    @property
    def names_classes(self) -> bool:
        """Whether these settings say anything about the classes: a config with no [data]
        classes (count, ignore label and names all left at their defaults) does not, and then
        takes them from the store or predictions it is used with."""
        return any(getattr(self, f.name) != f.default for f in dataclasses.fields(self)
                   if f.name in ("num_classes", "ignore_label", "class_names"))


@dataclass(frozen=True)
class ModelConfig:
    # A preset name of ddpmseg.backbone (lsun_256, faces_64, ...) or a path to a flags JSON.
    preset: str = "lsun_256"
    # A guided-diffusion .pt file, or a diffusers model folder (then preset is not used).
    checkpoint: str = ""
    # Stable Diffusion only: the text the UNet is conditioned on ("" = the empty prompt).
    prompt: str = ""


@dataclass(frozen=True)
class FeatureConfig:
    steps: tuple[int, ...] = (50, 150, 250)
    # Decoder block indices; diffusers backbones also take names such as "up2.res1".
    blocks: tuple[int | str, ...] = (5, 6, 7, 8, 12)
    seed: int = 0
    dtype: str = "float16"
    codec: str = "lossless"   # or "bitroundK": keep K mantissa bits (lossy, smaller store)
    precision: str = "fp32"
    images_per_batch: int = 1   # images per forward pass of the backbone

    def __post_init__(self):
        _check_values(self, "features")
        check_steps(self.steps, where="[features]")
        check_blocks(self.blocks, where="[features]")


@dataclass(frozen=True)
class ClassifierConfig:
    ensemble: int = 10
    lr: float = 1e-3
    pixels_per_batch: int = 64   # pixels per minibatch of the pixel classifiers
    max_epochs: int = 100
    min_epochs: int = 3
    patience: int = 50
    etf: str = "shared"
    etf_weight: float = 0.4
    seed: int = 0
    ram_budget_gb: float = 2.0

    def __post_init__(self):
        _check_values(self, "classifier")


@dataclass(frozen=True)
class PredictConfig:
    vote: str = "soft"
    tile_rows: int = 32

    def __post_init__(self):
        _check_values(self, "predict")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def replace(self, **sections: dict) -> "Config":
        """A copy with some keys changed: ``cfg.replace(classifier={"ensemble": 2})``.

        Sections are keyword arguments, each a dict of its keys' new values; ``None`` values
        are skipped (the CLI's "option not given"). Every value is checked as a config file's
        is: an unknown key or a bad value is one ``ConfigError`` line naming it
        (``[classifier].ensemble must be >= 1, got 0``). A config is frozen
        (``cfg.classifier.ensemble = 2`` raises ``FrozenInstanceError``): this is how one is
        changed.
        """
        changes = {}
        for name, values in sections.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"[{_section_field(name)}] must be given as a dict, got "
                                  f"{values!r}", f"write {name}={{\"key\": value}}")
            values = {k: v for k, v in (values or {}).items() if v is not None}
            if values:
                current = getattr(self, _section_field(name))
                changes[name] = _build(type(current), {**dataclasses.asdict(current), **values},
                                       name)
        return dataclasses.replace(self, **changes)

    # The old spelling of ``replace``, kept for one release.
    with_overrides = replace

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        sections = {}
        for name, values in raw.items():
            _section_field(name, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table", "see configs/ for examples")
            sections[name] = _build(_SECTIONS[name], values, name, source)
        return cls(**sections)


# Keys renamed in 0.x (one name per concept: "batch size" meant images in [features] and pixels
# in [classifier]): section -> old key -> new key. Configs, runs and stores that still spell
# the old key are read as the new one; a config file that does gets a note (load_toml).
RENAMED_KEYS = {"features": {"batch_size": "images_per_batch"},
                "classifier": {"batch_size": "pixels_per_batch"}}

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "features": FeatureConfig,
             "classifier": ClassifierConfig, "predict": PredictConfig}


def _section_field(name: str, source: str = "config") -> str:
    if name not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section [{name}]",
                          f"use one of {', '.join(_SECTIONS)}")
    return name


def _build(kind: type, values: dict, section: str, source: str = ""):
    """A section's dataclass from its values; errors name ``source`` (the file) and the key."""
    where = f"{source}: [{section}]" if source else f"[{section}]"
    hints = typing.get_type_hints(kind)
    known = {f.name for f in dataclasses.fields(kind)}
    kwargs = {}
    renamed = RENAMED_KEYS.get(section, {})
    for key, value in values.items():
        if renamed.get(key) is not None and renamed[key] not in values:
            key = renamed[key]
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return kind(**kwargs)
    except ConfigError as exc:  # a value out of range (_check_values): say which file
        if not source:
            raise
        raise ConfigError(f"{source}: {exc.message}", exc.hint) from None


# What each numeric or choice value must be: section -> key -> (test, what it must be). Checked
# whenever a section is made (a file, an override, a run's or a store's recorded config), so a
# value such as etf_weight = inf is refused where it is read, not an epoch into training.
def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _above(low):
    return lambda v: v > low, f"> {low}"


def _one_of(choices):
    return lambda v: v in choices, f"one of {', '.join(choices)}"


_RULES = {
    "data": {"num_classes": (lambda v: 1 <= v <= 256, "in 1..256"),
             "ignore_label": (lambda v: 0 <= v <= 255, "in 0..255"),
             "min_class_pixels": _at_least(0)},
    "features": {"seed": _at_least(0), "images_per_batch": _at_least(1)},  # steps, blocks: spec
    "classifier": {"ensemble": _at_least(1), "lr": _above(0),
                   "pixels_per_batch": (lambda v: v >= 2, ">= 2 (BatchNorm needs two pixels)"),
                   "max_epochs": _at_least(1), "min_epochs": _at_least(0),
                   "patience": _at_least(0), "etf": _one_of(ETF_MODES),
                   "etf_weight": _at_least(0), "seed": _at_least(0),
                   "ram_budget_gb": _above(0)},
    "predict": {"vote": _one_of(VOTES), "tile_rows": _at_least(1)},
}


def _check_values(section_obj, section: str) -> None:
    for key, (ok, wanted) in _RULES[section].items():
        value = getattr(section_obj, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"[{section}].{key} must be finite, got {value}",
                              f"give a number {wanted}")
        if not ok(value):
            raise ConfigError(f"[{section}].{key} must be {wanted}, got {value!r}",
                              "fix the value in the config or the option")


def _coerce(value, hint, where: str):
    """Check a TOML value against a dataclass field type; lists become tuples."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}", "write it as [a, b, ...]")
        return tuple(_coerce(v, item, where) for v in value)
    if isinstance(hint, types.UnionType):
        options = typing.get_args(hint)
        if any(isinstance(value, o) and not (o is int and isinstance(value, bool))
               for o in options):
            return value
        raise ConfigError(f"{where} must be {' or '.join(o.__name__ for o in options)}, got "
                          f"{value!r}", "fix the value's type")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or not isinstance(value, hint) or (
            hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}", "fix the value's type")
    return value


def load_toml(path: str | Path | None = None) -> Config:
    """Read a TOML config: a path, or the name of a bundled config (``ffhq_34``); None = defaults.

    ``ddpmseg.load_config`` also reads the reference's ``ddpm.json``."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{path.name}.toml"
    if not path.is_file():
        raise InputNotFoundError(f"config {path} not found",
                                 f"give a TOML file or one of: {', '.join(bundled_configs())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", "fix the syntax") from exc
    _note_renamed_keys(raw, str(path))
    return Config.from_dict(raw, source=str(path))


def _note_renamed_keys(raw: dict, source: str) -> None:
    """A note on stderr for each old key spelling in a config file (still read, one release)."""
    for section, renamed in RENAMED_KEYS.items():
        values = raw.get(section)
        for old, new in renamed.items():
            if isinstance(values, dict) and old in values:
                log.warning("note: %s: [%s] %s is deprecated and will be removed in the next "
                            "release; write %s", source, section, old, new)


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def check_classes(data: DataConfig, what: str, num_classes: int, ignore_label: int,
                  class_names, there: str,
                  hint: str = "give the config it was made with, or leave --config out") -> None:
    """Refuse a config whose classes are not those of a store or a prediction folder (``there``):
    class count, ignore label, and class names where both sides give them. ``what`` names the
    config in the one-line error ("config cat_15")."""
    ours = (data.num_classes, data.ignore_label)
    theirs = (int(num_classes), int(ignore_label))
    if ours != theirs:
        raise ConfigError(f"{what} has {ours[0]} classes (ignore label {ours[1]}) but {there} "
                          f"has {theirs[0]} classes (ignore label {theirs[1]})", hint)
    names = tuple(class_names or ())
    if data.class_names and names and tuple(data.class_names) != names:
        i = next((i for i, (a, b) in enumerate(zip(data.class_names, names)) if a != b),
                 min(len(data.class_names), len(names)))
        mine = data.class_names[i] if i < len(data.class_names) else None
        other = names[i] if i < len(names) else None
        raise ConfigError(f"{what} and {there} name the classes differently: class {i} is "
                          f"{mine!r} in {what}, {other!r} in {there}", hint)

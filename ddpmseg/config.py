"""Run configuration: TOML files read into frozen dataclasses.

A config has five sections, each a frozen dataclass with the reference's values as defaults:
``[data]``, ``[model]``, ``[features]``, ``[classifier]`` and ``[predict]``. Command-line options
override single keys (``with_overrides``); every run writes the resolved config as JSON.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InputNotFoundError
from .fileio import write_json

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    batch_size: int = 1


@dataclass(frozen=True)
class ClassifierConfig:
    ensemble: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    min_epochs: int = 3
    patience: int = 50
    etf: str = "shared"
    etf_weight: float = 0.4
    seed: int = 0
    ram_budget_gb: float = 2.0


@dataclass(frozen=True)
class PredictConfig:
    vote: str = "soft"
    tile_rows: int = 32


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

    def with_overrides(self, **sections: dict) -> "Config":
        """``cfg.with_overrides(classifier={"ensemble": 3})``; ``None`` values are skipped."""
        changes = {}
        for name, values in sections.items():
            values = {k: v for k, v in (values or {}).items() if v is not None}
            if values:
                current = getattr(self, _section_field(name))
                changes[name] = _build(type(current), {**dataclasses.asdict(current), **values}, name)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        sections = {}
        for name, values in raw.items():
            _section_field(name, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table", "see configs/ for examples")
            sections[name] = _build(_SECTIONS[name], values, f"{source}: [{name}]")
        return cls(**sections)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "features": FeatureConfig,
             "classifier": ClassifierConfig, "predict": PredictConfig}


def _section_field(name: str, source: str = "config") -> str:
    if name not in _SECTIONS:
        raise ConfigError(f"{source}: unknown section [{name}]",
                          f"use one of {', '.join(_SECTIONS)}")
    return name


def _build(kind: type, values: dict, where: str):
    hints = typing.get_type_hints(kind)
    known = {f.name for f in dataclasses.fields(kind)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return kind(**kwargs)


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


def load_config(path: str | Path | None = None) -> Config:
    """Read a TOML config: a path, or the name of a bundled config (``ffhq_34``); None = defaults.

    A ``.json`` file is read as the reference's ``ddpm.json`` (``reference_config``)."""
    if path is None:
        return Config()
    path = Path(path)
    if path.suffix.lower() == ".json":
        from .reference_config import load_reference_config
        return load_reference_config(path)
    if not path.exists() and not path.suffix:
        path = CONFIG_DIR / f"{path.name}.toml"
    if not path.is_file():
        raise InputNotFoundError(f"config {path} not found",
                                 f"give a TOML file or one of: {', '.join(bundled_configs())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", "fix the syntax") from exc
    return Config.from_dict(raw, source=str(path))


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))

"""Model and diffusion flags under guided-diffusion's names, and the named presets.

Checkpoints are published with the flag dict their training script used (``model_flags`` in the
fixtures), so we take that dict as it is instead of inventing our own vocabulary: a user can paste
the flags from a paper's README. Defaults are guided-diffusion's ``model_and_diffusion_defaults``
so that a partial dict means what it would mean there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ddpmseg.core.errors import ConfigError, InputNotFoundError
from ddpmseg.backbone.diffusion import SCHEDULES

# Flags of guided-diffusion that only matter for training or sampling; a feature extractor
# accepts them so that a full flag dict loads, and ignores them.
IGNORED_FLAGS = frozenset({
    "use_checkpoint", "use_kl", "predict_xstart", "rescale_learned_sigmas", "timestep_respacing",
})

# guided-diffusion's create_model picks these when channel_mult is "".
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# class_cond models of guided-diffusion are ImageNet models.
NUM_CLASSES = 1000


def _int(name: str, value: Any) -> int:
    # bool is an int subclass; True for a channel count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"model flag {name} must be an integer, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"model flag {name} must be true or false, got {value!r}")


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"model flag {name} must be a number, got {value!r}")
    return float(value)


def _number_tuple(name: str, value: Any, *, allow_float: bool) -> tuple:
    """A tuple from "1,1,2", [1, 1, 2], (1, 1, 2), 16 or ""."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    else:
        raise ConfigError(f"model flag {name} must be a comma-separated string or a list, "
                          f"got {value!r}")
    out = []
    for p in parts:
        try:
            num = float(p)
        except (TypeError, ValueError):
            raise ConfigError(f"model flag {name} has a non-number entry {p!r}") from None
        if isinstance(p, bool) or num <= 0:
            raise ConfigError(f"model flag {name} entries must be positive numbers, got {p!r}")
        if num.is_integer():
            out.append(int(num))
        elif allow_float:
            out.append(num)
        else:
            raise ConfigError(f"model flag {name} entries must be integers, got {p!r}")
    return tuple(out)


def _csv(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class ModelFlags:
    """guided-diffusion's model and diffusion flags, validated.

    ``channel_mult`` empty means guided-diffusion's default for ``image_size``;
    ``attention_resolutions`` holds resolutions in pixels (32, 16, 8), as the flag string does,
    not the downsample rates the UNet constructor takes.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple = ()
    attention_resolutions: tuple = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    learn_sigma: bool = False
    use_new_attention_order: bool = False
    class_cond: bool = False
    use_fp16: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    rescale_timesteps: bool = False

    def __post_init__(self) -> None:
        # Normalise here too so that ModelFlags(...) built in code is as safe as from_dict.
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("image_size", "num_channels", "num_res_blocks", "num_heads",
                     "num_head_channels", "num_heads_upsample", "diffusion_steps"):
            set_(name, _int(name, getattr(self, name)))
        for name in ("use_scale_shift_norm", "resblock_updown", "learn_sigma",
                     "use_new_attention_order", "class_cond", "use_fp16", "rescale_timesteps"):
            set_(name, _bool(name, getattr(self, name)))
        set_("dropout", _float("dropout", self.dropout))
        set_("channel_mult", _number_tuple("channel_mult", self.channel_mult, allow_float=True))
        set_("attention_resolutions", _number_tuple(
            "attention_resolutions", self.attention_resolutions, allow_float=False))
        if not isinstance(self.noise_schedule, str):
            raise ConfigError(f"model flag noise_schedule must be a string, "
                              f"got {self.noise_schedule!r}")
        set_("noise_schedule", self.noise_schedule.strip().lower())
        self._validate()

    def _validate(self) -> None:
        if self.image_size <= 0 or self.num_channels <= 0 or self.num_res_blocks <= 0:
            raise ConfigError("model flags image_size, num_channels and num_res_blocks must be "
                              "positive")
        if not self.channel_mult and self.image_size not in DEFAULT_CHANNEL_MULT:
            raise ConfigError(
                f"no default channel_mult for image_size {self.image_size}",
                f"give channel_mult explicitly (guided-diffusion has defaults for "
                f"{', '.join(map(str, sorted(DEFAULT_CHANNEL_MULT)))})")
        levels = len(self.mult)
        if self.image_size % (2 ** (levels - 1)):
            raise ConfigError(f"image_size {self.image_size} is not divisible by "
                              f"2**{levels - 1} for {levels} UNet levels")
        for mult in self.mult:
            width = int(mult * self.num_channels)
            if width % 32:
                raise ConfigError(
                    f"a UNet level of {width} channels (num_channels {self.num_channels} x "
                    f"{mult}) does not split into GroupNorm's 32 groups")
            if self.num_head_channels != -1 and width % self.num_head_channels:
                raise ConfigError(f"num_head_channels {self.num_head_channels} does not divide "
                                  f"the {width}-channel level")
        if self.num_head_channels == -1 and self.num_heads <= 0:
            raise ConfigError("num_heads must be positive when num_head_channels is -1")
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ConfigError("num_head_channels must be positive, or -1 to use num_heads")
        self._validate_heads()
        if self.diffusion_steps <= 0:
            raise ConfigError("diffusion_steps must be positive")
        if self.noise_schedule not in SCHEDULES:
            raise ConfigError(f"unknown noise_schedule {self.noise_schedule!r}",
                              f"use one of {', '.join(sorted(SCHEDULES))}")

    def _validate_heads(self) -> None:
        """Each attention layer splits its channels evenly over its heads (else the model
        builds, and its first forward fails)."""
        if self.num_head_channels != -1:
            return  # checked above: it divides every level
        if self.num_heads_upsample != -1 and self.num_heads_upsample <= 0:
            raise ConfigError("num_heads_upsample must be positive, or -1 to use num_heads")
        up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        levels = len(self.mult)
        rates = set(self.attention_ds)
        for level, mult in enumerate(self.mult):
            width = int(mult * self.num_channels)
            attends = 2 ** level in rates
            # The middle block attends at the deepest level, with num_heads.
            for name, heads, used in (("num_heads", self.num_heads,
                                       attends or level == levels - 1),
                                      ("num_heads_upsample", up, attends)):
                if used and width % heads:
                    raise ConfigError(f"{name} {heads} does not divide the {width}-channel "
                                      f"level that has attention",
                                      "use a number of heads that divides it, or set "
                                      "num_head_channels")

    # -- derived values ---------------------------------------------------------------------

    @property
    def mult(self) -> tuple:
        """The channel multipliers the model uses (the image size's default when empty)."""
        return self.channel_mult or DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def attention_ds(self) -> tuple:
        """Attention as downsample rates, the form UNet construction needs."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def out_channels(self) -> int:
        # learn_sigma adds the variance interpolation channels to epsilon.
        return 6 if self.learn_sigma else 3

    @property
    def num_classes(self) -> int | None:
        return NUM_CLASSES if self.class_cond else None

    # -- conversion -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelFlags":
        """Flags from a guided-diffusion flag dict (strings like "32,16,8" accepted).

        Training-only flags are ignored; a key guided-diffusion does not know is a ConfigError,
        because a misspelt flag would otherwise silently fall back to a default.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"model flags must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in IGNORED_FLAGS)
        if unknown:
            raise ConfigError(f"unknown model flag{'s' if len(unknown) > 1 else ''}: "
                              f"{', '.join(map(str, unknown))}",
                              f"known flags are {', '.join(sorted(known | IGNORED_FLAGS))}")
        respacing = d.get("timestep_respacing", "")
        if respacing not in ("", None):
            # Respacing changes which alphas step t means; features are defined on the full
            # schedule, so accepting it silently would give features of another model.
            raise ConfigError(f"timestep_respacing {respacing!r} is not supported",
                              "feature extraction uses the full schedule: set it to \"\"")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        """A JSON-able guided-diffusion flag dict that ``from_dict`` reads back."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = _csv(self.channel_mult)
        d["attention_resolutions"] = _csv(self.attention_resolutions)
        return d

    @classmethod
    def resolve(cls, x: "ModelFlags | Mapping | str | Path") -> "ModelFlags":
        """Flags from a ModelFlags, a preset name, a flag dict or a JSON file path.

        A JSON file may be the flag dict itself or hold it under "model_flags" (as the fixture
        and backbone JSONs do).
        """
        if isinstance(x, ModelFlags):
            return x
        if isinstance(x, Mapping):
            return cls.from_dict(x["model_flags"] if "model_flags" in x else x)
        if isinstance(x, (str, Path)):
            if isinstance(x, str) and x in PRESETS:
                return PRESETS[x]
            path = Path(x).expanduser()
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"cannot read model flags from {path}: {exc}") from exc
                if not isinstance(data, dict):
                    raise ConfigError(f"{path} does not hold a JSON object of model flags")
                return cls.from_dict(data.get("model_flags", data))
            if path.suffix.lower() == ".json" or "/" in str(x) or "\\" in str(x):
                raise InputNotFoundError(f"model flags file {path} does not exist",
                                         f"or use a preset: {', '.join(sorted(PRESETS))}")
            raise ConfigError(f"unknown model preset {x!r}",
                              f"use one of {', '.join(sorted(PRESETS))}, a flag dict or a "
                              f"JSON file")
        raise ConfigError(f"cannot make model flags from {type(x).__name__}")


# The published 256px LSUN/FFHQ checkpoints (bedroom, cat, horse, ffhq).
LSUN_256 = ModelFlags(
    image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8),
    num_heads=4, num_head_channels=64, num_heads_upsample=-1, dropout=0.1,
    use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
    diffusion_steps=1000, noise_schedule="linear",
)

PRESETS: dict[str, ModelFlags] = {
    "lsun_256": LSUN_256,
    # ../shared/backbones/adm_faces64: a small ADM trained on faces.
    "faces_64": ModelFlags(
        image_size=64, num_channels=32, num_res_blocks=2, attention_resolutions=(16, 8),
        num_heads=4, num_head_channels=-1, dropout=0.1, use_scale_shift_norm=True,
        resblock_updown=True, learn_sigma=False, noise_schedule="linear",
    ),
    # The parity fixtures in ../shared/fixtures/adm.
    "tiny_256": dataclasses.replace(LSUN_256, num_channels=32, num_head_channels=16),
    "tiny64_cosine": ModelFlags(
        image_size=64, num_channels=32, num_res_blocks=2, attention_resolutions=(16, 8),
        num_heads=4, num_head_channels=-1, dropout=0.0, use_scale_shift_norm=False,
        resblock_updown=False, learn_sigma=True, noise_schedule="cosine",
    ),
}

# The steps and blocks each preset is normally used with: a preset given alone on the command
# line brings these, so `--preset faces_64` works without --steps/--blocks. lsun_256's are the
# paper's (8448 dims); faces_64's are the demo's (its decoder has blocks 0..11, 1344 dims).
USUAL_FEATURES: dict[str, dict[str, tuple[int, ...]]] = {
    "lsun_256": {"steps": (50, 150, 250), "blocks": (5, 6, 7, 8, 12)},
    "tiny_256": {"steps": (50, 150, 250), "blocks": (5, 6, 7, 8, 12)},
    "faces_64": {"steps": (50, 150, 250), "blocks": (2, 4, 5, 7, 8)},
    "tiny64_cosine": {"steps": (50, 150, 250), "blocks": (2, 4, 5, 7, 8)},
}

"""``FeatureSpec``: the contract between the features and everything that consumes them.

Two sets of features are interchangeable exactly when their specs are equal: the same model
(``BackboneId``: checkpoint sha256 and flags), noise steps, decoder blocks, native map shapes,
image size, noise seed, stored dtype, compute precision and lossy rounding. A store records the spec it was
written with (inside ``StoreInfo``), a run records the spec it was trained on, and every check
(extract resuming a store, fit resuming a run, predict reading a store or a folder of images)
compares two specs with ``FeatureSpec.differences``, the one place that says what differs, and
``TOLERATED`` says, the one place, which differences each check lets pass.

It also holds what identifies the model that made a set of features (``BackboneId``: the kind of
backbone, the sha256 of its weights and its flags), the one place that reads or writes that JSON
object, and the names of stored dtypes and compute precisions. Nothing here imports torch.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from ddpmseg.core.errors import ConfigError

# The dtypes a store keeps values in (their numpy and torch types: featcache/codec.py), with
# the bytes of a value and the mantissa bits (the most that lossy rounding can keep).
STORE_DTYPES = ("float16", "bfloat16", "float32")
VALUE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}
# The ways an image of another size is fitted to the model's (``data.fit_image`` implements
# them; extract and predict take them as ``resize``), and the one a bare ``resize=True`` means
# (bench/nonsquare.py: README, "Non-square images").
RESIZE_MODES = ("stretch", "pad", "tiles")
DEFAULT_RESIZE = "stretch"
PRECISIONS = ("fp32", "bf16", "fp16")  # what a backbone computes in

# A decoder block: an index, or (diffusers) a name such as "up2" or "up2.res1".
BlockId = int | str


def block_id(value) -> BlockId:
    """A block as stores and configs keep it: an int when it is one (numpy ints included),
    else its name."""
    if isinstance(value, str):
        return int(value) if value.lstrip("-").isdigit() else value
    return int(value)


def check_steps(steps, num_steps: int | None = None, *, hint: str = "",
                where: str = "") -> tuple[int, ...]:
    """Diffusion steps as a tuple of ints: at least one, none repeated, each in
    0..num_steps-1 (only >= 0 while the model's ``num_steps`` is not known). Takes a list, a
    single int or an array. ConfigError otherwise; ``hint`` is its hint for a step out of range,
    ``where`` (e.g. "[features]") starts its message."""
    return _check_ids("steps", steps, num_steps, names=False, hint=hint, where=where)


def check_blocks(blocks, num_blocks: int | None = None, *, names: bool = True,
                 hint: str = "", where: str = "") -> tuple[BlockId, ...]:
    """Decoder blocks as a tuple of ``block_id``s: at least one, none repeated, an index in
    0..num_blocks-1 (only >= 0 while ``num_blocks`` is not known). ``names``: whether names
    ("up2.res1", diffusers) are allowed; the backbone that has such blocks checks the names
    themselves. Otherwise as ``check_steps``."""
    return _check_ids("blocks", blocks, num_blocks, names=names, hint=hint, where=where)


def _as_list(values) -> list:
    if isinstance(values, (str, numbers.Integral)):
        return [values]
    if hasattr(values, "reshape") and hasattr(values, "tolist"):  # numpy arrays, tensors
        return values.reshape(-1).tolist()
    try:
        return list(values)
    except TypeError:
        raise ConfigError(f"expected a list, got {values!r}") from None


def _check_ids(name: str, values, upper: int | None, *, names: bool, hint: str,
               where: str) -> tuple:
    at = f"{where}.{name}: " if where else ""
    one = name[:-1]
    out = []
    for v in _as_list(values):
        if names and isinstance(v, str):
            v = block_id(v)
            if isinstance(v, str):  # a name: its backbone knows which exist
                out.append(v)
                continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"{at}{name} must be integers, got {v!r}")
        if v < 0 or (upper is not None and v >= upper):
            known = f"this model's {name} are 0..{upper - 1}" if upper is not None else \
                f"{name} count from 0"
            raise ConfigError(f"{at}{one} {v} is out of range: {known}", hint)
        out.append(int(v))
    if not out:
        raise ConfigError(f"{at}no {name} given", f"list at least one {one}")
    if len(set(out)) != len(out):
        raise ConfigError(f"{at}{name} repeat a value: {out}", "list each once")
    return tuple(out)


def feature_dim(shapes: Iterable[tuple[int, int, int]]) -> int:
    """A pixel's feature width: the channels of all its maps."""
    return sum(s[0] for s in shapes)

# A random model has no file to hash: its "sha256" names the seed that built it.
RANDOM_PREFIX = "random-"
ADM = "adm"


@dataclass(frozen=True)
class BackboneId:
    sha256: str = ""
    flags: dict = field(default_factory=dict)   # ModelFlags.to_dict(), as JSON
    kind: str = ADM   # backbone kind; ADM ids carry no "kind" key, as format-1 stores wrote them

    def __post_init__(self):
        # Compare and store flags as JSON sees them (tuples and lists alike).
        object.__setattr__(self, "sha256", str(self.sha256 or ""))
        object.__setattr__(self, "flags", json.loads(json.dumps(dict(self.flags or {}))))
        object.__setattr__(self, "kind", str(self.kind or ADM))

    @classmethod
    def random(cls, seed: int, flags: Mapping | None = None) -> "BackboneId":
        return cls(f"{RANDOM_PREFIX}{int(seed)}", flags or {})

    @property
    def random_seed(self) -> int | None:
        """The seed of a ``Backbone.random`` model; None for a checkpoint."""
        if self.sha256.startswith(RANDOM_PREFIX):
            return int(self.sha256[len(RANDOM_PREFIX):])
        return None

    @classmethod
    def of(cls, backbone) -> "BackboneId":
        """The id of a backbone (anything with a ``fingerprint()`` dict)."""
        return cls.from_json(backbone.fingerprint())

    @classmethod
    def from_json(cls, raw: Mapping | None) -> "BackboneId":
        raw = raw or {}
        return cls(raw.get("sha256", ""), raw.get("flags") or {}, raw.get("kind", ADM))

    def to_json(self) -> dict:
        out = {"sha256": self.sha256, "flags": dict(self.flags)}
        if self.kind != ADM:
            out["kind"] = self.kind
        return out

    def differences(self, other: "BackboneId", here: str, there: str) -> list[str]:
        out = []
        if self.kind != other.kind:
            out.append(f"backbone kind ({self.kind} {here}, {other.kind} {there})")
        if self.sha256 != other.sha256:
            out.append(f"checkpoint sha256 ({self.sha256[:12]}... {here}, "
                       f"{other.sha256[:12]}... {there})")
        fa, fb = self.flags, other.flags
        keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        if keys:
            out.append("model flags " + ", ".join(
                f"{k} ({fa.get(k)!r} {here}, {fb.get(k)!r} {there})" for k in keys[:6]))
        return out



@dataclass(frozen=True)
class FeatureSpec:
    steps: tuple[int, ...]
    blocks: tuple[int | str, ...]             # decoder indices, or names (diffusers)
    shapes: tuple[tuple[int, int, int], ...]  # (C, h, w) per (step, block), feature order
    image_size: tuple[int, int]               # (H, W) of the images the maps were made from
    backbone: BackboneId = field(default_factory=BackboneId)
    seed: int = 0                             # the shared noise's seed
    dtype: str = "float16"                    # as stored: one of STORE_DTYPES
    precision: str = "fp32"                   # the model's compute precision: one of PRECISIONS
    # Mantissa bits a lossy store keeps (``--codec bitroundK``); None: lossless. Stores and
    # runs written before it was part of the contract have none, and read as lossless.
    keepbits: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "steps", tuple(int(t) for t in self.steps))
        set_(self, "blocks", tuple(block_id(b) for b in self.blocks))
        set_(self, "shapes", tuple(tuple(int(v) for v in s) for s in self.shapes))
        set_(self, "image_size", tuple(int(v) for v in self.image_size))
        set_(self, "seed", int(self.seed))
        if self.keepbits is not None:
            set_(self, "keepbits", int(self.keepbits))
        if isinstance(self.backbone, Mapping):
            set_(self, "backbone", BackboneId.from_json(self.backbone))

    @property
    def keys(self) -> list[tuple[int, int]]:
        """(step, block) of each map, in feature order (step-major)."""
        return [(t, b) for t in self.steps for b in self.blocks]

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.shapes)

    # -- JSON: the flat keys format-1 stores and runs have always used ------------------------
    def to_json(self) -> dict:
        return {"steps": list(self.steps), "blocks": list(self.blocks),
                "shapes": [list(s) for s in self.shapes], "image_size": list(self.image_size),
                "dtype": self.dtype, "seed": self.seed, "fingerprint": self.backbone.to_json(),
                "precision": self.precision, "keepbits": self.keepbits}

    @classmethod
    def from_json(cls, raw: Mapping) -> "FeatureSpec":
        return cls(steps=raw["steps"], blocks=raw["blocks"], shapes=raw["shapes"],
                   image_size=raw["image_size"],
                   backbone=BackboneId.from_json(raw.get("fingerprint")),
                   seed=raw.get("seed", 0), dtype=raw.get("dtype", "float16"),
                   precision=raw.get("precision", "fp32"), keepbits=raw.get("keepbits"))

    @classmethod
    def of_backbone(cls, backbone, steps: Iterable[int], blocks: Iterable[BlockId],
                    image_size: tuple[int, int], **rest) -> "FeatureSpec":
        """The spec of ``backbone``'s features at ``steps`` x ``blocks`` for images of
        ``image_size``: its id and the shape of each map (``backbone.block_shapes``), in feature
        order; ``rest``: seed, dtype, precision. Any backbone (``FeatureBackbone``) will do:
        this module never imports one."""
        steps, blocks = tuple(steps), tuple(block_id(b) for b in blocks)
        by_block = backbone.block_shapes(blocks)
        return cls(steps=steps, blocks=blocks,
                   shapes=tuple(tuple(by_block[b]) for _ in steps for b in blocks),
                   image_size=image_size, backbone=BackboneId.of(backbone), **rest)

    # -- comparing ---------------------------------------------------------------------------
    def differences(self, other: "FeatureSpec", here: str = "here", there: str = "there",
                    only: Iterable[str] | None = None,
                    ignore: Iterable[str] = ()) -> list[str]:
        """What differs between ``self`` (described as ``here``) and ``other`` (``there``), one
        readable phrase per field; empty when the features are interchangeable. ``only`` /
        ``ignore`` restrict the comparison to / away from some field names."""
        names = [f.name for f in fields(self)]
        names = [n for n in names if (only is None or n in set(only)) and n not in set(ignore)]
        out = []
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if a == b:
                continue
            if name == "backbone":
                out.extend(a.differences(b, here, there))
            elif name == "shapes":
                continue  # follows from the model and blocks, said below only if alone
            elif name == "keepbits":
                out.append(f"rounding ({rounding_name(a)} {here}, {rounding_name(b)} {there})")
            else:
                out.append(f"{name} ({short(a)} {here}, {short(b)} {there})")
        if not out and "shapes" in names and self.shapes != other.shapes:
            out.append(f"native shapes ({short(self.shapes)} {here}, {short(other.shapes)} "
                       f"{there})")
        return out


# What each comparison of two sets of features (or of two stores' infos, whose field names
# these are too) lets differ; every other difference is refused. The one list of them.
TOLERATED = {
    # predict from a store: features close to the run's, not equal (a warning per field)
    "predict": ("seed", "dtype", "precision", "keepbits"),
    # sweep: a train and a test store of the same model; the sweep picks steps and blocks
    "sweep": ("steps", "blocks", "shapes"),
    # fit resuming a run: how the store is encoded changes no feature or label a member sees
    # (a lossy codec's rounding does: it is the spec's keepbits, compared with the rest)
    "fit": ("codec", "format_version", "images_per_shard"),
    # extract resuming a store: its images (the store follows its folder: featcache.content),
    # and its layout (a store keeps the format and shard size it was made with)
    "extract": ("names", "format_version", "images_per_shard"),
}


def rounding_name(keepbits: int | None) -> str:
    """The ``--codec`` name of a rounding: "lossless" or "bitroundK"."""
    return "lossless" if keepbits is None else f"bitround{keepbits}"


def short(value, limit: int = 60) -> str:
    """A value for a message: lists cut after 8 items, text after ``limit`` characters."""
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value[:8]) + (",..." if len(value) > 8 else "")
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

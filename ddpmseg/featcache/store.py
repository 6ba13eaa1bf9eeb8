"""The on-disk feature store: one Zarr (format 3) group per extraction.

Layout (the full description is FORMAT.md, beside this file):

    zarr.json                 attributes: "ddpmseg" = StoreInfo (format version, fingerprint,
                              steps, ...), "config" = the resolved run config
    act_t{t}_b{b}/            (N, C, h, w) native-resolution activation, one image per chunk
                              (formats 3 and 4: in shards of ``images_per_shard`` images; FORMAT.md)
    labels/                   (N, H, W) uint8, after the reference's rare-class rule
                              (absent in a prediction-only store: has_labels False)
    complete/                 (N,) uint8, 1 once every array of that image is written

An image is written array by array and flagged complete last, so a killed writer never leaves
a half-written image that reads as complete. Every chunk ends with a crc32c checksum; a chunk
that fails it, or that is missing for an image flagged complete, is a ``StoreError`` naming the
image.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ddpmseg.config import Config
from ddpmseg.core import objectstore
from ddpmseg.core.errors import (
    ConfigError,
    NotInStoreError,
    StaleWriterError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.core.fileio import is_url
from ddpmseg.featcache import image_records, integrity, zarr_adapter
# The codec's public names are read from here too (``ddpmseg.featcache.store.parse_codec``...),
# as before they moved to codec.py: kept for one release.
from ddpmseg.featcache.codec import (  # noqa: F401 - re-exported
    BFLOAT16_ENCODING,
    DEFAULT_CODEC,
    ZARR_DTYPES,
    codec_name,
    decode_map,
    encode_image,
    encode_map,
    parse_codec,
    round_mantissa,
    zarr_codecs,
)
from ddpmseg.spec import MANTISSA_BITS, STORE_DTYPES, FeatureSpec, short  # noqa: F401

# 2: dimension names carry their size (channel_1024, y_32, x_32), so xarray opens the store as
# one Dataset; 1 named every activation's axes channel/y/x. Both read alike.
if TYPE_CHECKING:
    import torch

# 3: every array is sharded (zarr's sharding codec): one file holds ``images_per_shard``
# images' chunks of one array, so a pool of 100k images is thousands of files, not millions.
# 4: format 3 with the images' names and state in the array image_records instead of the group
# attributes (featcache.image_records; FORMAT.md "Per-image records"), so that appending an
# image rewrites one records chunk, not every name. New sharded stores are format 4.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# Images per shard of a new store (``extract(images_per_shard=...)``; 0 makes a format-2 store,
# one file per image per array).
DEFAULT_IMAGES_PER_SHARD = 64
# The writer token: the attribute "writer" holds the token of the extract attempt that owns the
# store (a new one per attempt, under the writer lock), and the array "writer" holds per image
# [token of the attempt that wrote it, digest of its maps as stored]. A dask task of an attempt
# whose client is gone finds another token and stops before it writes; an image that such a
# task wrote anyway carries a foreign token (or maps that are not the recorded ones), which
# ``verify`` reports and the next extract redoes.
WRITER = "writer"
# The attribute of what the store's images are (``content.ImageState``: hashes, inactive).
IMAGES_ATTR = "images"
# What ``records`` gives for a record that fails its checksum (a token no attempt draws).
DAMAGED_RECORD = (2 ** 64 - 1, 0)



@dataclass(frozen=True)
class StoreInfo:
    """Everything a reader needs to interpret the arrays; saved as the group's attributes.

    ``spec`` says which features the maps are (model, steps, blocks, shapes, seed, dtype...);
    the rest says which images and labels the store holds and how it is encoded. The spec's
    fields read as attributes of the info too (``info.steps``, ``info.fingerprint``...).
    """

    spec: FeatureSpec
    num_images: int
    names: tuple[str, ...]
    num_classes: int
    ignore_label: int
    class_names: tuple[str, ...] = ()
    has_labels: bool = True
    codec: dict = field(default_factory=lambda: dict(DEFAULT_CODEC))
    format_version: int = FORMAT_VERSION
    min_class_pixels: int = 20   # the rare-class rule applied to the stored labels
    # Formats 3 and 4: images per shard (0 below format 3: one chunk file per image per array).
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD

    steps = property(lambda self: self.spec.steps)
    blocks = property(lambda self: self.spec.blocks)
    shapes = property(lambda self: self.spec.shapes)
    image_size = property(lambda self: self.spec.image_size)
    dtype = property(lambda self: self.spec.dtype)
    seed = property(lambda self: self.spec.seed)
    precision = property(lambda self: self.spec.precision)
    keys = property(lambda self: self.spec.keys)
    feature_dim = property(lambda self: self.spec.feature_dim)

    def __post_init__(self):
        # The codec's keepbits (as stores have always recorded it) is the features' rounding:
        # the codec sets it, and the spec carries it, so that every contract check
        # (FeatureSpec.differences) sees it. A codec without keepbits is lossless.
        keepbits = self.codec.get("keepbits")
        if self.spec.keepbits != keepbits:
            object.__setattr__(self, "spec", replace(self.spec, keepbits=keepbits))
        # Formats 1 and 2 have no shards; formats 3 and 4 always have them (one per image at least).
        if self.format_version < 3:
            object.__setattr__(self, "images_per_shard", 0)
        elif int(self.images_per_shard) < 1:
            raise ConfigError(f"images per shard must be at least 1, got {self.images_per_shard}",
                              "pass `images_per_shard=N` with N >= 1 (0 only makes a format-2 "
                              "store, through extract)")

    @property
    def has_image_records(self) -> bool:
        """Whether names and image state live in the image_records array (format 4)."""
        return self.format_version >= 4

    def attrs_json(self) -> dict:
        """The ``ddpmseg`` attribute: ``to_json`` without the names where the records hold
        them (run directories keep ``to_json``, names included)."""
        raw = self.to_json()
        if self.has_image_records:
            del raw["names"]
        return raw

    @property
    def sharded(self) -> bool:
        return self.images_per_shard > 0

    def shard_of(self, i: int) -> int:
        """The shard holding image i (its own chunk file, i, in an unsharded store)."""
        return int(i) // self.images_per_shard if self.sharded else int(i)

    @property
    def fingerprint(self) -> dict:
        return self.spec.backbone.to_json()

    def to_json(self) -> dict:
        """The flat attribute object of format 1 (the keys in their historical order)."""
        spec = self.spec.to_json()
        raw = {k: spec[k] for k in ("steps", "blocks", "shapes", "image_size")}
        raw.update(num_images=self.num_images, names=list(self.names),
                   num_classes=self.num_classes, ignore_label=self.ignore_label,
                   class_names=list(self.class_names), has_labels=self.has_labels,
                   dtype=spec["dtype"], seed=spec["seed"], fingerprint=spec["fingerprint"],
                   codec=dict(self.codec), format_version=self.format_version,
                   precision=spec["precision"], min_class_pixels=self.min_class_pixels)
        if self.sharded:
            raw["images_per_shard"] = self.images_per_shard
        return json.loads(json.dumps(raw))

    @classmethod
    def from_json(cls, raw: dict) -> "StoreInfo":
        return cls(spec=FeatureSpec.from_json(raw), num_images=raw["num_images"],
                   # format 4: the names are in the image_records array (``open``)
                   names=tuple(raw["names"] if raw.get("format_version", 1) < 4
                               else raw.get("names", ())), num_classes=raw["num_classes"],
                   ignore_label=raw["ignore_label"],
                   class_names=tuple(raw.get("class_names", ())),
                   has_labels=raw.get("has_labels", True),
                   codec=raw.get("codec", dict(DEFAULT_CODEC)),
                   format_version=raw.get("format_version", 1),
                   min_class_pixels=raw.get("min_class_pixels", 20),
                   images_per_shard=raw.get("images_per_shard", 0))

    def differences(self, other: "StoreInfo", here: str = "here",
                    there: str = "in the store", ignore: Sequence[str] = ()) -> list[str]:
        """Readable list of what differs between ``self`` (asked) and ``other`` (stored): the
        spec's differences, then the image list, classes and encoding."""
        out = self.spec.differences(other.spec, here, there, ignore=ignore)
        if "names" not in ignore and self.names != other.names:
            extra = sorted(set(self.names) - set(other.names))
            gone = sorted(set(other.names) - set(self.names))
            detail = f"{len(self.names)} images {here}, {len(other.names)} {there}"
            if extra:
                detail += f"; new: {short(extra)}"
            if gone:
                detail += f"; not in the data folder: {short(gone)}"
            if not extra and not gone:
                detail += "; same names, other order"
            out.append(f"names ({detail})")
        for key in ("num_classes", "ignore_label", "class_names", "has_labels", "codec",
                    "format_version", "min_class_pixels", "images_per_shard"):
            a, b = getattr(self, key), getattr(other, key)
            if key == "codec":  # its keepbits is the spec's rounding, compared above
                a, b = ({k: v for k, v in c.items() if k != "keepbits"} for c in (a, b))
            if key not in ignore and a != b:
                out.append(f"{key} ({short(a)} {here}, {short(b)} {there})")
        return out


def map_dims(c: int, h: int, w: int) -> tuple[str, ...]:
    """An activation array's dimension names: one name per distinct size, so arrays of other
    sizes never share a dimension name (xarray requires one size per name)."""
    return ("image", f"channel_{c}", f"y_{h}", f"x_{w}")


def label_dims(height: int, width: int) -> tuple[str, ...]:
    return ("image", f"y_{height}", f"x_{width}")


def array_name(t: int, b: int) -> str:
    return f"act_t{t}_b{b}"


def new_writer_token() -> int:
    """A random writer token (non-zero; below 2**53, exact in any JSON reader)."""
    return secrets.randbelow(2 ** 53 - 1) + 1


def maps_digest(maps: Sequence[np.ndarray]) -> int:
    """64-bit digest of an image's maps as stored (feature order), never 0 (0: none)."""
    h = hashlib.blake2b(digest_size=8)
    for m in maps:
        h.update(np.ascontiguousarray(m).tobytes())
    return int.from_bytes(h.digest(), "little") or 1


def store_attributes(info: StoreInfo, config: dict | None = None, writer: int = 0) -> dict:
    """The group attributes of a store of ``info``, with their digest: whatever writes or
    rewrites them (creation, a store that grows) writes this whole object."""
    attrs = {"ddpmseg": info.attrs_json()}
    if config is not None:
        attrs["config"] = json.loads(json.dumps(config))
    if writer:
        attrs[WRITER] = int(writer)
    attrs[integrity.DIGEST_KEY] = integrity.attrs_digest(attrs)
    return attrs


def array_specs(info: StoreInfo) -> list[tuple[str, dict]]:
    """(name, ``create_array`` arguments) of every array a store of ``info`` has, in creation
    order ("complete" last: a store whose "complete" array exists has all its arrays). The
    one definition of the arrays' metadata: creation uses it, and opening checks each
    array's stored metadata against it (integrity.check_arrays)."""
    n = info.num_images
    codecs = zarr_codecs(info.codec)
    # Every chunk is written, even one equal to the fill value, so that "flagged complete
    # but a chunk is missing" always means damage, never an all-zero map.
    cfg = {"write_empty_chunks": True}
    act_attrs = {"dtype": info.dtype}
    if info.codec.get("keepbits") is not None:
        act_attrs["keepbits"] = info.codec["keepbits"]   # lossy: mantissa bits kept
    if info.dtype == "bfloat16":
        act_attrs["encoding"] = BFLOAT16_ENCODING
    # Format 1 named the dimensions alike for every size; format 2 names them by size.
    old_dims = info.format_version == 1
    out = []
    for (t, b), (c, h, w) in zip(info.keys, info.shapes):
        out.append((array_name(t, b), dict(
            shape=(n, c, h, w), chunks=(1, c, h, w), dtype=ZARR_DTYPES[info.dtype],
            compressors=codecs, fill_value=0, config=cfg,
            dimension_names=("image", "channel", "y", "x") if old_dims else map_dims(c, h, w),
            attributes={**act_attrs, "step": t, "block": b})))
    if info.has_labels:
        height, width = info.image_size
        out.append(("labels", dict(
            shape=(n, height, width), chunks=(1, height, width), dtype=np.uint8,
            compressors=codecs, fill_value=info.ignore_label, config=cfg,
            dimension_names=("image", "y", "x") if old_dims else label_dims(height, width))))
    out.append((WRITER, dict(
        shape=(n, 2), chunks=(1, 2), dtype=np.uint64, compressors=[Crc32cCodec()],
        fill_value=0, config=cfg, dimension_names=("image", "writer_record"))))
    if info.has_image_records:
        out.append(image_records.array_spec(n, info.images_per_shard))
    out.append(("complete", dict(
        shape=(n,), chunks=(1,), dtype=np.uint8, compressors=[Crc32cCodec()], fill_value=0,
        config=cfg, dimension_names=("image",))))
    if info.sharded:
        # Format 3: the maps and labels in shards of images_per_shard images' chunks; the
        # flags and records in chunks of that many images (one file, and one chunk to decode,
        # per shard: reading every flag costs N / images_per_shard reads). Whoever writes a
        # shard of images writes those images' flags and records, and no other writer does.
        per = info.images_per_shard
        for name, kw in out:
            if name in (WRITER, "complete"):
                kw["chunks"] = (per,) + tuple(kw["chunks"][1:])
            else:
                kw["shards"] = (per,) + tuple(kw["chunks"][1:])
    return out


REPAIR_HINT = ("the store is damaged; rerun the same extract with `repair=True` "
               "to re-extract the damaged images")


def _chunk_problem(name: str, r) -> str:
    """What is wrong with one read chunk (``zarr_adapter.read_images`` result), or ''."""
    if r is zarr_adapter.Missing:
        return f"flagged complete but its chunk of {name} is missing"
    if isinstance(r, BaseException):
        if isinstance(r, (KeyboardInterrupt, SystemExit)):
            raise r
        return f"the chunk of {name} is corrupt ({type(r).__name__}: {r})"
    return ""


def _not_finite(name: str, m: np.ndarray) -> str:
    if np.isfinite(m).all():
        return ""
    bad = int(m.size - np.count_nonzero(np.isfinite(m)))
    return f"the chunk of {name} holds {bad} NaN or infinite value(s)"


def _exists(path) -> bool:
    # A URL (s3://, memory://): whether any object lies under it.
    return objectstore.exists(str(path)) if is_url(path) else Path(path).exists()


def is_store(path) -> bool:
    """Whether ``path`` names a feature store: a local folder with its zarr.json, or any URL
    (s3://, memory://...: only a store is read from one, image and mask folders are local).
    The one test of "a store, or a folder of images/masks" for every command that takes
    either. A URL is not reached here (``FeatureStore.open`` says what is there)."""
    return is_url(path) or (Path(path) / "zarr.json").is_file()


class FeatureStore:
    """Reader (and low-level writer) of a feature store. Open with ``FeatureStore.open(path)``.

    Readers: ``len(store)``, ``store.names``, ``store.info``, ``store.complete()``,
    ``store.maps(i)``, ``store.labels(i)``, ``store.pixel_features(i, ys, xs)``,
    ``store.dense_rows(i, y0, y1)``, and lazy ``store.dask_array(t, b)`` / ``dask_labels()``.
    Each call reads only the chunks of the image it names.
    """

    def __init__(self, group: zarr.Group, info: StoreInfo, path: str):
        self.group = group
        self.info = info
        self.path = path
        self._arrays: dict[str, zarr.Array] = {}
        self._complete: np.ndarray | None = None
        # The token this handle writes with (the store's at opening); ``guard``: check before
        # each image that the store still has it (a dask task of one attempt).
        self.writer = int(group.attrs.get(WRITER, 0) or 0)
        self.guard = False
        self.previous_writer = 0   # the token before ``begin_attempt``
        self._has_records: bool | None = None
        self._image_records: list = []   # format 4: the first num_images image records
        # Sharded stores: images waiting for the rest of their shard (write_image).
        self._lock = threading.Lock()
        self._planned: dict[int, set] = {}
        self._buffer: dict[int, dict] = {}
        self._shard_locks: dict[int, threading.Lock] = {}

    # -- creation and writing -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, info: StoreInfo, overwrite: bool = False,
               config: dict | None = None) -> "FeatureStore":
        """Make the group, its attributes (with a new writer token) and every (empty) array;
        write no chunk."""
        if info.dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {info.dtype!r}", f"use one of {STORE_DTYPES}")
        # Format 4: the names exist only in the records, so the attributes say 0 images until
        # the records are written (a kill before that leaves an empty store a rerun grows).
        first = replace(info, num_images=0, names=()) if info.has_image_records else info
        attrs = store_attributes(first, config, new_writer_token())
        if is_url(path):  # no credentials, endpoint or bucket: one line, before any write
            objectstore.check_access(str(path))
        try:
            group = zarr.create_group(store=str(path), overwrite=overwrite, zarr_format=3,
                                      attributes=attrs)
        except zarr.errors.ContainsGroupError as exc:
            raise StoreError(f"{path} already exists", "pass `overwrite=True` to "
                             "replace it, or choose another path") from exc
        store = cls(group, first, str(path))
        store.info = info   # the arrays are made at the full size
        store.create_missing_arrays()
        store._complete = np.zeros(info.num_images, dtype=bool)
        if info.has_image_records:
            store.info = first
            store.record(info, None)
        return store

    def create_missing_arrays(self) -> list[str]:
        """Create the (empty) arrays the store should have and lacks; returns their names.

        ``create`` makes them all; a writer killed while creating them leaves some out, and a
        resumed extraction makes the rest, exactly as ``create`` would have.
        """
        existing = set(self.group.array_keys())
        made = []
        for name, kwargs in array_specs(self.info):
            if name not in existing:
                self.group.create_array(name, **kwargs)
                made.append(name)
        self._has_records = None
        return made

    def images_attribute(self) -> dict | None:
        """The recorded image state (``content.ImageState`` as JSON), or None."""
        if self.info.has_image_records:
            # None, as a format 3 store's absent attribute, until some state is recorded
            # (a store made by FeatureStore.create alone has only names).
            if not any(r.hashes or r.inactive or r.size for r in self._image_records):
                return None
            return image_records.to_images(self._image_records)
        return self.group.attrs.get(IMAGES_ATTR)

    def record(self, info: StoreInfo, images: dict | None) -> None:
        """Record the store's info (names, count) and image state: in one attribute write,
        or (format 4) the records that changed, then the attributes (the commit)."""
        if not info.has_image_records:
            self.update_attrs({"ddpmseg": info.to_json(), IMAGES_ATTR: images})
            self.info = info
            return
        new = image_records.from_images(info.names, images)
        arr = self._arr(image_records.IMAGE_RECORDS)
        for run in image_records.changed_runs(self._image_records, new):
            image_records.write(arr, run.start, new[run.start:run.stop])
        if info != self.info:
            self.update_attrs({"ddpmseg": info.attrs_json()})
        self._image_records, self.info = new, info

    def update_attrs(self, changes: dict) -> None:
        """Change some group attributes, rewriting them whole with their digest (one write)."""
        attrs = self.group.attrs.asdict()
        attrs.update(changes)
        # The digest covers every attribute (featcache.integrity): recomputed in the same write.
        attrs[integrity.DIGEST_KEY] = integrity.attrs_digest(attrs)
        self.group.attrs.update(attrs)

    def begin_attempt(self) -> int:
        """Give the store a new writer token (this handle writes with it); returns the one it
        had (0: none). Called under the writer lock when an extract attempt starts: tasks of
        earlier attempts stop at their next image."""
        self.previous_writer = int(self.group.attrs.get(WRITER, 0) or 0)
        self.writer = new_writer_token()
        self.update_attrs({WRITER: self.writer})
        return self.previous_writer

    def current_writer(self) -> int:
        """The writer token the store has now, read fresh (0 when its metadata is gone: a store
        being replaced)."""
        try:
            group = zarr.open_group(self.path, mode="r", zarr_format=3)
            return int(group.attrs.get(WRITER, 0) or 0)
        except Exception:  # noqa: BLE001 - no readable group: not ours to write any more
            return 0

    def check_writer(self, i: int) -> None:
        """With ``guard``: raise StaleWriterError when the store has another writer token."""
        if not self.guard:
            return
        now = self.current_writer()
        if now != self.writer:
            raise StaleWriterError(
                f"{self.path}: another extract now owns this store (writer token "
                f"{self.writer:x} became {now:x}): this task of an earlier, interrupted "
                f"extract stops without writing image {i} ({self.info.names[i]})",
                "nothing to do: the extract that owns the store writes the image")

    def has_records(self) -> bool:
        """Whether the store has the per-image writer records (stores from before them lack
        the array until an extract reopens them)."""
        if self._has_records is None:
            try:
                self._arr(WRITER)
                self._has_records = True
            except StoreError:
                self._has_records = False
        return self._has_records

    def records(self) -> np.ndarray:
        """(N, 2) uint64: per image [writer token, maps digest]; zeros where none is recorded,
        ``DAMAGED_RECORD`` where the chunk fails its checksum."""
        if not self.has_records():
            return np.zeros((len(self), 2), dtype=np.uint64)
        arr = self._arr(WRITER)
        try:
            return np.asarray(arr[:len(self)], dtype=np.uint64)
        except Exception:  # noqa: BLE001 - find the damaged records one by one
            out = np.zeros((len(self), 2), dtype=np.uint64)
            for i, r in enumerate(zarr_adapter.read_each(arr, len(self))):
                if isinstance(r, (KeyboardInterrupt, SystemExit)):
                    raise r
                if isinstance(r, BaseException):
                    out[i] = DAMAGED_RECORD
                elif r is not zarr_adapter.Missing:
                    out[i] = np.asarray(r, dtype=np.uint64)
            return out

    def foreign_images(self, accepted=()) -> list[int]:
        """Complete images whose record names another writer than this handle's (or one of
        ``accepted``; 0 is a store from before the records): written by another attempt."""
        ok = {0, self.writer, *accepted}
        tokens = self.records()[:, 0]
        return [int(i) for i in np.flatnonzero(self.complete())
                if int(tokens[i]) not in ok]

    def restamp(self, done: np.ndarray) -> None:
        """Record this handle's token for the complete images (``done``, bool per image),
        accepted from the attempts before it; their maps digest stays. After that, an image
        with another token was written by a task of an earlier attempt meanwhile."""
        if not self.has_records():
            return
        rec = self.records()
        stale = [int(i) for i in np.flatnonzero(done) if int(rec[i, 0]) != self.writer]
        if stale:
            rec[stale, 0] = self.writer
            zarr_adapter.write_rows([(self._arr(WRITER), rec[stale])], stale)

    def encode(self, i: int, maps: Sequence) -> list[np.ndarray]:
        """Image i's maps cast to the store dtype (raises FeatureOverflowError naming it)."""
        return encode_image(maps, self.info.spec, f"image {i} ({self.info.names[i]})")

    def write_image(self, i: int, maps: Sequence, labels: np.ndarray | None = None, *,
                    encoded: bool = False) -> None:
        """Write image i's maps (feature order) and labels, then flag it complete.

        ``maps`` are float tensors/arrays, cast and checked here, or (``encoded=True``) the
        output of ``encode``. Different images may be written from different threads or
        processes: each touches only its own chunks (unsharded), or its own shards: in a
        sharded store an image of a shard with planned images (``plan_writes``) waits in
        memory until the shard's last one comes, then the shard is written whole.
        """
        i = self._index(i)
        self.check_writer(i)
        if not encoded:
            maps = self.encode(i, maps)
        labels = self._checked_labels(i, labels)
        if not self.info.sharded:
            self._write_rows([(i, maps, labels)])
            return
        s = self.info.shard_of(i)
        with self._lock:
            waiting = self._buffer.setdefault(s, {})
            waiting[i] = (maps, labels)
            ready = set(waiting) >= self._planned.get(s, {i})
            items = self._buffer.pop(s) if ready else None
        if items:
            self._write_rows([(k, *items[k]) for k in sorted(items)])

    def plan_writes(self, indices: Sequence[int]) -> None:
        """The images this handle is about to write (a sharded store buffers each shard's
        until all of them are in, then writes each array's shard once: a full shard is
        written with no read and no rewrite). Unplanned images are written at once."""
        planned: dict[int, set] = {}
        for i in indices:
            planned.setdefault(self.info.shard_of(i), set()).add(int(i))
        with self._lock:
            self._planned = planned

    def flush(self) -> None:
        """Write the images still waiting for the rest of their shard (a plan not carried out
        to its end), then forget the plan."""
        with self._lock:
            waiting, self._buffer, self._planned = self._buffer, {}, {}
        for items in waiting.values():
            self._write_rows([(k, *items[k]) for k in sorted(items)])

    def discard_writes(self) -> None:
        """Drop the images waiting in memory (a run that failed: they are redone)."""
        with self._lock:
            self._buffer, self._planned = {}, {}

    def _checked_labels(self, i: int, labels) -> np.ndarray | None:
        if not self.info.has_labels:
            return None
        if labels is None:
            raise StoreError(f"image {i} ({self.info.names[i]}): the store holds labels but "
                             "none were given")
        labels = np.asarray(labels, dtype=np.uint8)
        if labels.shape != tuple(self.info.image_size):
            raise StoreError(f"image {i}: labels are {labels.shape}, the store's image size "
                             f"is {tuple(self.info.image_size)}")
        return labels

    def _write_rows(self, items: list) -> None:
        """Write (index, encoded maps, labels) of consecutive-or-not images of one shard (or
        one image): flags of finished ones cleared, then every array, then their records,
        then their flags set, in that order (a kill between leaves them incomplete)."""
        rows = [i for i, _, _ in items]
        with self._lock:
            lock = self._shard_locks.setdefault(self.info.shard_of(rows[0]), threading.Lock())
        with lock:  # writes into one shard read, merge and rewrite it: one at a time
            self._write_rows_locked(items, rows)

    def _write_rows_locked(self, items: list, rows: list[int]) -> None:
        complete = self._arr("complete")
        redo = [i for i in rows if self._complete is None or self._complete[i]]
        if redo:  # rewriting finished images: incomplete until done again
            zarr_adapter.write_rows([(complete, np.zeros(len(redo), np.uint8))], redo)
        targets = [(self._arr(array_name(t, b)), np.stack([m[k] for _, m, _ in items]))
                   for k, (t, b) in enumerate(self.info.keys)]
        if self.info.has_labels:
            targets.append((self._arr("labels"), np.stack([lab for _, _, lab in items])))
        zarr_adapter.write_rows(targets, rows)
        if self.has_records():
            self.check_writer(rows[0])  # again: the maps took a while
            rec = np.array([[self.writer, maps_digest(m)] for _, m, _ in items], dtype=np.uint64)
            zarr_adapter.write_rows([(self._arr(WRITER), rec)], rows)
        zarr_adapter.write_rows([(complete, np.ones(len(rows), np.uint8))], rows)
        if self._complete is not None:
            self._complete[rows] = True

    def write_labels(self, i: int, labels: np.ndarray) -> None:
        """Rewrite only image i's labels chunk (a corrected mask); its maps are untouched."""
        i = self._index(i)
        labels = np.asarray(labels, dtype=np.uint8)
        if labels.shape != tuple(self.info.image_size):
            raise StoreError(f"image {i}: labels are {labels.shape}, the store's image size "
                             f"is {tuple(self.info.image_size)}")
        zarr_adapter.write_images([(self._arr("labels"), labels)], i)

    def resize(self, n: int) -> None:
        """Give every array room for ``n`` images along the image axis (metadata only when
        growing: no existing chunk is read or written). The attributes are the caller's."""
        records = [WRITER] if self.has_records() else []
        for name in self._array_names() + records + ["complete"]:
            arr = self._arr(name)
            if arr.shape[0] != n:
                arr.resize((n,) + tuple(arr.shape[1:]))
        if self._complete is not None and len(self._complete) != n:
            grown = np.zeros(n, dtype=bool)
            k = min(n, len(self._complete))
            grown[:k] = self._complete[:k]
            self._complete = grown

    def assume_incomplete(self) -> None:
        """Take every image as not yet written, without reading the flags (for a writer that
        was handed only images known to be incomplete)."""
        self._complete = np.zeros(self.info.num_images, dtype=bool)

    def mark_incomplete(self, i: int) -> None:
        self._arr("complete")[self._index(i)] = 0
        if self._complete is not None:
            self._complete[i] = False

    def remove_partial_files(self) -> int:
        """Delete the temporary files a killed writer of a local store leaves behind."""
        return zarr_adapter.remove_partial_files(self.path)

    # -- reading --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        """Open a store, checking its attributes against their digest and every array's
        metadata against the attributes (``integrity``): damage is a StoreError naming the
        file, before any chunk is read. A URL's object store is reached first
        (``core.objectstore.check_access``): no credentials, endpoint or bucket is a
        StoreAccessError."""
        if is_url(path):
            objectstore.check_access(str(path))
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            attrs = group.attrs.asdict()
            raw = attrs["ddpmseg"]
        except (FileNotFoundError, KeyError) as exc:
            what = "is not a ddpmseg feature store" if _exists(path) else "does not exist"
            raise StoreError(f"{path} {what}",
                             "run `ddpmseg extract` to make one") from exc
        except Exception as exc:  # noqa: BLE001 - unparsable group metadata is damage
            if not _exists(path):
                raise StoreError(f"{path} does not exist",
                                 "run `ddpmseg extract` to make one") from exc
            raise StoreError(f"{str(path).rstrip('/')}/zarr.json is unreadable "
                             f"({type(exc).__name__}: {integrity._first_line(exc)})",
                             "the store is damaged; re-extract it with `overwrite=True`") from exc
        integrity.check_attrs(attrs, str(path))
        try:
            info = StoreInfo.from_json(raw)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StoreError(f"{path} is not a ddpmseg feature store (its attributes do not "
                             f"describe one: {type(exc).__name__}: {exc})",
                             "run `ddpmseg extract` to make one") from exc
        if info.format_version not in READABLE_VERSIONS:
            raise StoreMismatchError(f"{path} has store format {info.format_version}, this "
                                     f"ddpmseg reads {', '.join(map(str, READABLE_VERSIONS))}",
                                     "re-extract the store, or upgrade ddpmseg")
        store = cls(group, info, str(path))
        arrays = integrity.check_arrays(group, array_specs(info), str(path))
        # write_empty_chunks is runtime configuration, not metadata (see _arr).
        store._arrays = {k: a.with_config({"write_empty_chunks": True})
                         for k, a in arrays.items()}
        if info.has_image_records:
            recs = image_records.read(store._arr(image_records.IMAGE_RECORDS),
                                      info.num_images, str(path))
            store._image_records = recs
            store.info = replace(info, names=tuple(r.name for r in recs))
        return store

    @property
    def config(self) -> dict:
        """The resolved config the store was made with (as JSON), or {}."""
        return dict(self.group.attrs.get("config", {}))

    def recorded_config(self) -> Config | None:
        """That config as a ``Config`` (its name, classes and [classifier] section are what
        ``fit`` trains with by default), or None for a store written without one."""
        raw = self.config
        if not raw:
            return None
        try:
            return Config.from_dict(raw, source=f"{self.path} (its recorded config)")
        except ConfigError as exc:
            raise ConfigError(exc.message,
                              "pass `config=PATH` to train with another config") from None

    def __len__(self) -> int:
        return self.info.num_images

    def __repr__(self) -> str:
        return (f"FeatureStore({self.path!r}, {len(self)} images, {self.info.feature_dim} dims, "
                f"{self.info.dtype})")

    @property
    def names(self) -> tuple[str, ...]:
        return self.info.names

    def _arr(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            try:
                # write_empty_chunks is runtime configuration, not metadata: set it on every
                # opening, or a reopened store would skip chunks equal to the fill value.
                arr = self.group[name].with_config({"write_empty_chunks": True})
            except KeyError as exc:
                raise StoreError(f"{self.path}: array {name} is missing", "the store is damaged; "
                                 "re-extract it with `overwrite=True`") from exc
            self._arrays[name] = arr
        return arr

    def _index(self, i: int) -> int:
        i = int(i)
        n = self.info.num_images
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for a store of {n} images")
        return i % n

    def complete(self) -> np.ndarray:
        """(N,) bool: which images are fully written (read fresh from the store). A flag
        whose chunk is damaged counts as incomplete (that image is redone), never as an
        error for the whole store."""
        arr = self._arr("complete")
        try:
            # [:N]: a grow killed after resizing the arrays, before recording the new names,
            # leaves them longer than the attributes say; the attributes are the truth.
            flags = np.asarray(arr[:len(self)]).astype(bool)
        except Exception:  # noqa: BLE001 - find the damaged flags one by one
            flags = np.zeros(len(self), dtype=bool)
            for i, r in enumerate(zarr_adapter.read_each(arr, len(self))):
                if isinstance(r, (KeyboardInterrupt, SystemExit)):
                    raise r
                flags[i] = (not isinstance(r, BaseException) and r is not zarr_adapter.Missing
                            and bool(r))
        self._complete = flags
        return self._complete.copy()

    def damaged_flags(self) -> list[int]:
        """Images whose complete flag cannot be read (their chunk fails its checksum)."""
        arr = self._arr("complete")
        return [i for i, r in enumerate(zarr_adapter.read_each(arr, len(self)))
                if isinstance(r, Exception)]

    def _require_complete(self, i: int) -> None:
        if self._complete is None:
            self.complete()
        if not self._complete[i]:
            self.complete()
            if not self._complete[i]:
                raise StoreError(f"{self.path}: image {i} ({self.names[i]}) is not complete",
                                 "extraction was interrupted; rerun the same `ddpmseg extract` "
                                 "command to finish it")

    def missing_chunks(self, i: int) -> list[str]:
        """Names of the arrays whose chunk of image i is absent from storage."""
        return self.missing_by_image([i])[self._index(i)]

    def missing_by_image(self, indices: Sequence[int]) -> dict[int, list[str]]:
        """{i: names of the arrays whose chunk file of image i is absent}: each file (a
        shard, in format 3) is asked about once, however many images it holds."""
        names = self._array_names()
        arrays = [self._arr(n) for n in names]
        by_file: dict[int, list[str]] = {}
        out = {}
        for i in (self._index(i) for i in indices):
            s = self.info.shard_of(i)
            if s not in by_file:
                present = zarr_adapter.chunks_exist(arrays, i)
                by_file[s] = [n for n, ok in zip(names, present) if not ok]
            out[i] = by_file[s]
        return out

    def _array_names(self) -> list[str]:
        names = [array_name(t, b) for t, b in self.info.keys]
        return names + (["labels"] if self.info.has_labels else [])

    def _read(self, i: int, names: list[str]) -> list[np.ndarray]:
        """Image i's chunks of ``names``, read concurrently; damage is a StoreError naming it."""
        i = self._index(i)
        self._require_complete(i)
        results = zarr_adapter.read_images([self._arr(n) for n in names], i)
        label = f"image {i} ({self.names[i]})"
        out = []
        for name, r in zip(names, results):
            problem = _chunk_problem(name, r)
            if problem:
                raise StoreError(f"{self.path}: {label}: {problem}", REPAIR_HINT) from (
                    r if isinstance(r, BaseException) else None)
            out.append(np.asarray(r))
        return out

    def damage(self, i: int) -> list[tuple[str, str]]:
        """(array, what is wrong) for each chunk of image i that is missing, fails its
        checksum or holds non-finite values; [] for a sound image. ``verify`` and
        ``extract --repair`` call it for every complete image."""
        i = self._index(i)
        names = self._array_names()
        out = []
        maps = []
        for name, r in zip(names, zarr_adapter.read_images([self._arr(n) for n in names], i)):
            problem = _chunk_problem(name, r)
            if not problem and name != "labels":
                maps.append(np.asarray(r))
                problem = _not_finite(name, decode_map(r, self.info.dtype))
            if problem:
                out.append((name, problem))
        if not out:
            out.extend((WRITER, what) for what in self._record_problems(i, maps))
        return out

    def _record_problems(self, i: int, maps: list[np.ndarray]) -> list[str]:
        """What image i's writer record says is wrong: written by another attempt than the
        store's, or maps that are not the ones its writer recorded (two attempts' writes)."""
        token = int(self.group.attrs.get(WRITER, 0) or 0)
        if not token or not self.has_records():
            return []
        try:
            got, digest = (int(v) for v in np.asarray(self._arr(WRITER)[i], dtype=np.uint64))
        except Exception as exc:  # noqa: BLE001 - a record that fails its checksum
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return [f"the writer record is corrupt ({type(exc).__name__}: {exc})"]
        if got not in (0, token):
            return [f"written by another extract attempt (writer {got:x}; the store's is "
                    f"{token:x}): an orphaned task of an interrupted run wrote it"]
        if digest and digest != maps_digest(maps):
            return ["its maps are not the ones its writer recorded (two extract attempts "
                    "wrote them)"]
        return []

    def labels(self, i: int) -> np.ndarray:
        """(H, W) uint8 class indices of image i (after the rare-class rule)."""
        if not self.info.has_labels:
            raise StoreError(f"{self.path} holds no labels (its images had no masks)",
                             "extract a folder with masks to train or evaluate")
        return self._read(i, ["labels"])[0]

    def maps(self, i: int) -> list[np.ndarray]:
        """Image i's native maps (C, h, w) in feature order: float16 or float32 as stored
        (bfloat16 stores are widened to float32)."""
        names = [array_name(t, b) for t, b in self.info.keys]
        maps = [decode_map(a, self.info.dtype) for a in self._read(i, names)]
        # Checked once per image as it is loaded: a NaN never reaches training or a mask.
        for name, m in zip(names, maps):
            problem = _not_finite(name, m)
            if problem:
                raise StoreError(f"{self.path}: image {i} ({self.names[i]}): {problem}",
                                 REPAIR_HINT)
        return maps

    def map(self, i: int, t: int, b) -> np.ndarray:
        """Image i's native map of step t, block b alone (reads only that array's chunk)."""
        if (t, b) not in self.info.keys:
            raise NotInStoreError(f"{self.path} has no activation for step {t}, block {b}",
                                  self._features_hint())
        m = decode_map(self._read(i, [array_name(t, b)])[0], self.info.dtype)
        problem = _not_finite(array_name(t, b), m)
        if problem:
            raise StoreError(f"{self.path}: image {i} ({self.names[i]}): {problem}", REPAIR_HINT)
        return m

    def _features_hint(self) -> str:
        return (f"it has steps {short(self.info.steps)} and blocks {short(self.info.blocks)}; "
                "extract the others into a store of their own")

    def pixel_features(self, i: int, ys, xs) -> torch.Tensor:
        from ddpmseg.featcache import pixels  # torch: reading a store needs none

        return pixels.pixel_features(self.maps(i), self.info.image_size, ys, xs)

    def dense_rows(self, i: int, y0: int, y1: int) -> torch.Tensor:
        from ddpmseg.featcache import pixels

        return pixels.dense_rows(self.maps(i), self.info.image_size, y0, y1)

    # -- lazy reading -------------------------------------------------------------------
    def dask_array(self, t: int, b: int):
        """(N, C, h, w) dask array over the (t, b) activations, one image per dask chunk.

        Lazy: nothing is read until computed. bfloat16 stores come out as float32. No
        completeness check: read ``complete()`` first when the store may be unfinished.
        """
        if (t, b) not in self.info.keys:
            raise NotInStoreError(f"{self.path} has no activation for step {t}, block {b}",
                                  self._features_hint())
        arr = da.from_zarr(self._arr(array_name(t, b)))
        if self.info.dtype == "bfloat16":
            arr = arr.map_blocks(decode_map, "bfloat16", dtype=np.float32)
        return arr

    def dask_labels(self):
        """(N, H, W) uint8 dask array over the labels."""
        if not self.info.has_labels:
            raise StoreError(f"{self.path} holds no labels", "extract a folder with masks")
        return da.from_zarr(self._arr("labels"))

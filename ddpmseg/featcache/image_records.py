"""Per-image records: each image's name, content hashes, inactive flag and size in a zarr
array of the store, one UTF-8 JSON text per image, chunked like the flags arrays.

Used by format 4 stores (the default for new sharded stores; formats 1-3 keep these in the
group attributes, ``content``); FORMAT.md "Per-image records". Why: the attributes are
rewritten whole (with their digest) on every change, so appending one image to a store of N
rewrites O(N) bytes; a record array rewrites only the chunk (``images_per_shard`` records)
that the appended image falls in, and the array's small ``zarr.json`` when it grows.

Layout: array ``image_records``, shape (N,), zarr data type ``string`` (codecs ``vlen-utf8``
then ``crc32c``), chunks (S,), fill value "" (no record). Record i is the canonical JSON (no
spaces; a fixed-order list) ``[name, [image sha256, mask sha256 or null] or null,
inactive, [height, width, resize mode or null] or null]``. Each chunk file ends with its
crc32c: a damaged chunk is a ``StoreError`` naming the file (``read``) and is listed by
``damaged`` (for ``verify``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ddpmseg.core.errors import StoreError

IMAGE_RECORDS = "image_records"
# Names and hashes exist only in the records: --repair cannot rebuild them.
_HINT = ("records cannot be repaired; re-extract the store with the same command plus "
         "`overwrite=True`")


@dataclass(frozen=True)
class ImageRecord:
    """One image's record. ``hashes`` is None for an image extracted before hashes were
    recorded; ``size`` is None where no size was recorded."""

    name: str
    hashes: tuple | None = None
    inactive: bool = False
    size: tuple | None = None

    def to_text(self) -> str:
        body = [self.name, None if self.hashes is None else list(self.hashes),
                bool(self.inactive), None if self.size is None else list(self.size)]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_text(cls, text: str, where: str) -> "ImageRecord":
        problem = StoreError(f"{where}: an image record is not readable ({text[:80]!r})",
                             _HINT)
        try:
            name, hashes, inactive, size = json.loads(text)
            record = cls(name, None if hashes is None else tuple(hashes), inactive,
                         None if size is None else tuple(size))
        except (ValueError, TypeError) as exc:
            raise problem from exc
        if not isinstance(name, str) or not name or not isinstance(inactive, bool):
            raise problem
        return record


def from_images(names: Sequence[str], images: dict | None) -> list[ImageRecord]:
    """The records of a store's names (store order) and image state as the attribute
    ``images`` holds it (``content.ImageState.to_json``)."""
    images = images or {}
    hashes, sizes = images.get("hashes", {}), images.get("sizes", {})
    inactive = set(images.get("inactive", ()))
    return [ImageRecord(n, None if hashes.get(n) is None else tuple(hashes[n]), n in inactive,
                        None if sizes.get(n) is None else tuple(sizes[n])) for n in names]


def to_images(recs: Sequence[ImageRecord]) -> dict:
    """The ``images`` attribute's JSON of records: ``from_images`` undone."""
    out = {"hashes": {r.name: list(r.hashes) for r in recs if r.hashes is not None},
           "inactive": [r.name for r in recs if r.inactive]}
    sizes = {r.name: list(r.size) for r in recs if r.size is not None}
    if sizes:
        out["sizes"] = sizes
    return out


def changed_runs(old: Sequence[ImageRecord], new: Sequence[ImageRecord]) -> list[range]:
    """The runs of consecutive indices whose record in ``new`` differs from ``old`` (or is
    past its end): what to write, and no more."""
    runs: list[range] = []
    for i, rec in enumerate(new):
        if i < len(old) and old[i] == rec:
            continue
        if runs and runs[-1].stop == i:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


def array_spec(num_images: int, images_per_shard: int) -> tuple[str, dict]:
    """(name, ``create_array`` arguments) of the records array."""
    return IMAGE_RECORDS, dict(
        shape=(num_images,), chunks=(max(1, images_per_shard),), dtype=str,
        compressors=[Crc32cCodec()], fill_value="", config={"write_empty_chunks": True},
        dimension_names=("image",))


def create(group: zarr.Group, num_images: int, images_per_shard: int) -> zarr.Array:
    name, kw = array_spec(num_images, images_per_shard)
    return group.create_array(name, **kw)


def write(arr: zarr.Array, start: int, records: Sequence[ImageRecord]) -> None:
    """Write records start, start+1, ...; the array grows first if they go past its end.
    Only the chunks they fall in are rewritten (a partial chunk: read, merged, rewritten)."""
    if not records:
        return
    end = start + len(records)
    if end > arr.shape[0]:
        arr.resize((end,))
    arr[start:end] = np.array([r.to_text() for r in records], dtype=object)


def chunk_file(path: str, k: int) -> str:
    return f"{str(path).rstrip('/')}/{IMAGE_RECORDS}/c/{k}"


def _parse(texts, lo: int, per: int, path: str) -> list[ImageRecord]:
    out = []
    for i, text in enumerate(texts, start=lo):
        where = chunk_file(path, i // per)
        if not text:
            raise StoreError(f"{where}: image {i} has no record", _HINT)
        out.append(ImageRecord.from_text(str(text), where))
    return out


def _read_chunk(arr: zarr.Array, k: int, n: int, path: str) -> list[ImageRecord]:
    per = arr.chunks[0]
    lo, hi = k * per, min(n, (k + 1) * per)
    try:
        texts = arr[lo:hi]
    except Exception as exc:  # noqa: BLE001 - any decode failure (checksum, codec) is damage
        raise StoreError(f"{chunk_file(path, k)}: the image records are damaged (they fail "
                         "their checksum or cannot be decoded)", _HINT) from exc
    return _parse(texts, lo, per, path)


def read(arr: zarr.Array, num_images: int, path: str) -> list[ImageRecord]:
    """The first ``num_images`` records (the array may be longer: a grow stopped before
    recording its new count). A damaged or missing record is a StoreError naming its file."""
    if arr.shape[0] < num_images:
        raise StoreError(f"{path}: {arr.shape[0]} image records for {num_images} images",
                         _HINT)
    try:   # one read: zarr fetches the chunks concurrently (an object store's round trips)
        texts = arr[:num_images]
    except Exception:  # noqa: BLE001 - damage somewhere: chunk by chunk, to name its file
        for k in range(-(-num_images // arr.chunks[0])):
            _read_chunk(arr, k, num_images, path)
        raise
    return _parse(texts, 0, arr.chunks[0], path)


def damaged(arr: zarr.Array, num_images: int, path: str) -> list[tuple[str, str]]:
    """[(chunk file, problem)] for every records chunk that cannot be read (for ``verify``)."""
    per = arr.chunks[0]
    out = []
    for k in range(-(-num_images // per)):
        try:
            _read_chunk(arr, k, num_images, path)
        except StoreError as exc:
            out.append((chunk_file(path, k), exc.message.split(": ", 1)[-1]))
    return out

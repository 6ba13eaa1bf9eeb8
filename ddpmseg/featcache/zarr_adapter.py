"""The parts of zarr (3.x) that ddpmseg uses beyond its documented public API, in one place.

Each is pinned by tests/featcache/test_zarr_adapter.py, so a zarr release that changes one
fails there, by name, rather than somewhere in the store:

1. ``zarr.core.sync.sync`` runs a coroutine on zarr's own event-loop thread. The store reads
   and writes one image's chunk of every array concurrently (``asyncio.gather`` over
   ``Array.async_array``), which the public synchronous API does one array at a time.
2. ``Array.store_path / Array.metadata.encode_chunk_key(coords)`` is where a chunk lives: the
   store asks whether a chunk exists without decoding it (a missing chunk of an image flagged
   complete is damage, not the fill value). In a sharded array (formats 3 and 4) the chunk grid is
   the grid of shards: image i's file is shard ``i // shards[0]`` (``Array.shards``); an inner
   chunk absent from a present shard reads as the fill value (zarr gives no public way to ask),
   which the image's maps digest (store.WRITER) catches for the maps.
3. zarr's ``LocalStore`` writes each file to ``<path without suffix>.<uuid4 hex>.partial`` and
   renames it into place; a writer killed between the two leaves that file behind, and a
   resumed extraction deletes it (``remove_partial_files``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")


class Missing:
    """Stands for a chunk that is absent from storage."""


def _chunk_path(arr: zarr.Array, i: int):
    """The storage path of the file holding image i's chunk (its shard in a sharded array;
    the chunk of several images' flags in formats 3 and 4)."""
    k = i // (arr.shards or arr.chunks)[0]
    return arr.store_path / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))


def chunks_exist(arrays: Sequence[zarr.Array], i: int) -> list[bool]:
    """Whether each array's chunk of image ``i`` (its first-axis chunk) is in storage."""
    async def check():
        return await asyncio.gather(*(_chunk_path(a, i).exists() for a in arrays))

    return list(sync(check()))


def read_images(arrays: Sequence[zarr.Array], i: int) -> list:
    """``arr[i]`` of every array, read concurrently: an ndarray, ``Missing`` for an absent
    chunk, or the exception its decoding raised (a failed checksum)."""
    async def one(arr):
        if not await _chunk_path(arr, i).exists():
            return Missing
        return await arr.async_array.getitem(i)

    async def read_all():
        return await asyncio.gather(*(one(a) for a in arrays), return_exceptions=True)

    return sync(read_all())


def write_images(targets: Sequence[tuple[zarr.Array, np.ndarray]], i: int) -> None:
    """``arr[i] = value`` for every (array, value), written concurrently."""
    async def write_all():
        await asyncio.gather(*(a.async_array.setitem(i, v) for a, v in targets))

    sync(write_all())


def write_rows(targets: Sequence[tuple[zarr.Array, np.ndarray]], rows: Sequence[int]) -> None:
    """``arr[rows] = value`` for every (array, value stacked along the first axis): arrays
    written concurrently, each one run of consecutive rows after the other (two writes into one
    shard at once would each read, merge and rewrite it, and one would be lost)."""
    rows = [int(r) for r in rows]
    runs, start = [], 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[k - 1] + 1:
            runs.append((start, k))
            start = k

    async def one(arr, value):
        # A file whose every image is written here is deleted first: zarr would read it to
        # merge (a damaged shard index or chunk would fail the write; a sound one is read for
        # nothing). The caller has flagged those images incomplete.
        per = (arr.shards or arr.chunks)[0]
        await asyncio.gather(*(_chunk_path(arr, k * per).delete()
                               for k in whole_shards(arr, rows)))
        for a, b in runs:
            await arr.async_array.setitem(slice(rows[a], rows[a] + b - a), value[a:b])

    async def write_all():
        await asyncio.gather(*(one(a, np.asarray(v)) for a, v in targets))

    sync(write_all())


def whole_shards(arr: zarr.Array, rows: Sequence[int]) -> list[int]:
    """The files (shards, or chunks of several images) that ``rows`` cover entirely ([] for
    one chunk file per image: zarr replaces those without reading them)."""
    per, n, have = (arr.shards or arr.chunks)[0], arr.shape[0], set(rows)
    if per == 1:
        return []
    return [k for k in sorted({r // per for r in have})
            if have >= set(range(k * per, min((k + 1) * per, n)))]


def remove_partial_files(root: str | Path) -> int:
    """Delete the temporary files a killed writer of a local store left; returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    count = 0
    for p in root.rglob("*.partial"):
        if PARTIAL_FILE.search(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    return count


# Chunk files ``read_each`` reads at once: its memory does not grow with the pool.
READ_AT_ONCE = 64


def read_each(arr: zarr.Array, n: int) -> list:
    """``arr[i]`` for i < n: a value, ``Missing``, or the exception its decoding raised (so
    one damaged chunk does not hide the others), for every image of the chunk. Each chunk
    (S images' flags in formats 3 and 4) is read once, READ_AT_ONCE at a time."""
    per = arr.chunks[0]

    async def one(k, limit):
        lo, hi = k * per, min(n, (k + 1) * per)
        async with limit:
            if not await _chunk_path(arr, lo).exists():
                return [Missing] * (hi - lo)
            try:
                return list(await arr.async_array.getitem(slice(lo, hi)))
            except Exception as exc:  # noqa: BLE001 - a failed checksum: each image's answer
                return [exc] * (hi - lo)

    async def read_all():
        limit = asyncio.Semaphore(READ_AT_ONCE)
        return await asyncio.gather(*(one(k, limit) for k in range(-(-n // per))))

    return [r for part in sync(read_all()) for r in part]

"""Per-image records (featcache.image_records): round trip, O(1) append, damage named by file.
The array itself; stores of format 4 (test_fc_format4.py) use it."""

from __future__ import annotations


import numpy as np
import pytest
import zarr
import zarr.storage

from ddpmseg.core.errors import StoreError
from ddpmseg.featcache import content, image_records
from ddpmseg.featcache.image_records import ImageRecord


def _recs(n, start=0):
    return [ImageRecord(f"img{i:05d}", (f"{i:064x}", None if i % 2 else f"{i + 1:064x}"),
                        i % 3 == 0, (10 + i, 20, "crop") if i % 4 else None)
            for i in range(start, start + n)]


def _group(path):
    return zarr.open_group(str(path), mode="w", zarr_format=3)


def test_round_trip_and_state(tmp_path):
    g = _group(tmp_path / "s.zarr")
    arr = image_records.create(g, 0, 4)
    recs = _recs(10) + [ImageRecord('a "quoted" naïve\\name')]
    image_records.write(arr, 0, recs)
    again = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[image_records.IMAGE_RECORDS]
    assert image_records.read(again, 11, "S") == recs
    assert image_records.damaged(again, 11, "S") == []
    images = image_records.to_images(recs)
    names = [r.name for r in recs]
    assert image_records.from_images(names, images) == recs
    state = content.ImageState.from_json(images)
    assert image_records.from_images(names, state.to_json()) == recs
    # A name with no recorded hashes (a store from before hashes) keeps none.
    assert image_records.from_images(["old"], None) == [ImageRecord("old")]
    assert image_records.to_images([ImageRecord("old")]) == {"hashes": {}, "inactive": []}
    assert image_records.changed_runs(recs[:5], recs[:3] + [ImageRecord("x")] + recs[4:8]) \
        == [range(3, 4), range(5, 8)]
    # A longer array (a grow stopped before its count was recorded) reads its first N.
    assert image_records.read(again, 7, "S") == recs[:7]


def test_append_rewrites_one_chunk(tmp_path, count_writes):
    """Appending one record to 3,000 writes about what it writes to 30: the last chunk and
    the array's zarr.json, never the whole pool."""
    sizes = {}
    for n in (30, 3000):
        g = _group(tmp_path / f"s{n}.zarr")
        arr = image_records.create(g, 0, 8)
        image_records.write(arr, 0, _recs(n))
        with count_writes() as written:
            image_records.write(arr, n, _recs(1, start=n))
        sizes[n] = sum(written.values())
        assert set(written) <= {"image_records/zarr.json", f"image_records/c/{n // 8}"}
        assert image_records.read(arr, n + 1, "S")[-1] == _recs(1, start=n)[0]
    assert sizes[3000] < sizes[30] + 64, sizes


def test_damaged_chunk_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    image_records.write(image_records.create(_group(path), 0, 4), 0, _recs(10))
    f = path / "image_records" / "c" / "1"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0x10
    f.write_bytes(bytes(raw))
    arr = zarr.open_group(str(path), mode="r")[image_records.IMAGE_RECORDS]
    with pytest.raises(StoreError, match=r"image_records/c/1: the image records are damaged"):
        image_records.read(arr, 10, str(path))
    damaged = image_records.damaged(arr, 10, str(path))
    assert [p for p, _ in damaged] == [f"{path}/image_records/c/1"]
    (path / "image_records" / "c" / "2").unlink()   # a missing chunk: records with no text
    problems = dict(image_records.damaged(arr, 10, str(path)))
    assert problems[f"{path}/image_records/c/2"] == "image 8 has no record"


def test_unreadable_record_text(tmp_path):
    arr = image_records.create(_group(tmp_path / "s.zarr"), 0, 4)
    image_records.write(arr, 0, _recs(2))
    arr[1:2] = np.array(['["x", null, "no", null]'], dtype=object)
    with pytest.raises(StoreError, match="not readable"):
        image_records.read(arr, 2, "S")

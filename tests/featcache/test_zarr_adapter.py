"""What ddpmseg relies on in zarr beyond its public API (featcache/zarr_adapter.py), pinned."""

from pathlib import Path

import numpy as np
import pytest
import zarr

from ddpmseg.featcache import zarr_adapter


class Killed(BaseException):
    """Not an Exception: zarr's own clean-up does not catch it, as with a killed process."""


def test_a_killed_local_store_write_leaves_a_partial_file_the_adapter_removes(tmp_path,
                                                                               monkeypatch):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 4), chunks=(1, 4), dtype="u1")

    def killed(self, target):
        raise Killed

    monkeypatch.setattr(Path, "replace", killed)
    with pytest.raises(Killed):
        arr[0] = 7
    monkeypatch.undo()
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".partial")]
    assert len(left) == 1 and zarr_adapter.PARTIAL_FILE.search(left[0].name)
    assert not zarr_adapter.PARTIAL_FILE.search("0.partial")  # a user's own file is not ours to delete
    assert zarr_adapter.remove_partial_files(tmp_path / "a.zarr") == 1
    assert not left[0].exists()
    assert zarr_adapter.remove_partial_files(tmp_path / "nothing") == 0


def test_concurrent_reads_and_writes_and_chunk_existence(tmp_path):
    a = zarr.create_array(str(tmp_path / "a.zarr"), shape=(3, 2, 2), chunks=(1, 2, 2),
                          dtype="f4", fill_value=0)
    b = zarr.create_array(str(tmp_path / "b.zarr"), shape=(3, 5), chunks=(1, 5), dtype="u1",
                          fill_value=0, config={"write_empty_chunks": True})
    assert zarr_adapter.chunks_exist([a, b], 1) == [False, False]
    va, vb = np.arange(4, dtype="f4").reshape(2, 2) + 1, np.zeros(5, "u1")
    zarr_adapter.write_images([(a, va), (b, vb)], 1)
    assert zarr_adapter.chunks_exist([a, b], 1) == [True, True]  # an all-fill chunk is written too
    assert zarr_adapter.chunks_exist([a, b], 2) == [False, False]
    got = zarr_adapter.read_images([a, b], 1)
    assert np.array_equal(got[0], va) and np.array_equal(got[1], vb)
    assert zarr_adapter.read_images([a, b], 0) == [zarr_adapter.Missing, zarr_adapter.Missing]


def test_read_each_reads_each_flags_chunk_once(tmp_path, monkeypatch):
    """Flags in chunks of 4 images (formats 3 and 4): a sound chunk gives each image's value,
    a damaged one its exception for each of its images, an absent one Missing; each chunk
    file is read once, not once per image (at 100k images that was 100k reads at once)."""
    from zarr.codecs import Crc32cCodec

    arr = zarr.create_array(str(tmp_path / "complete"), shape=(10,), chunks=(4,), dtype="uint8",
                            compressors=[Crc32cCodec()], fill_value=0)
    arr[:8] = np.arange(1, 9, dtype=np.uint8)
    raw = bytearray((tmp_path / "complete" / "c" / "1").read_bytes())
    raw[0] ^= 1
    (tmp_path / "complete" / "c" / "1").write_bytes(bytes(raw))
    reads = []
    real = zarr.storage.LocalStore.get

    async def counting(self, key, *args, **kwargs):
        reads.append(key)
        return await real(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting)
    got = zarr_adapter.read_each(zarr.open_array(str(tmp_path / "complete"), mode="r"), 10)
    assert [int(v) for v in got[:4]] == [1, 2, 3, 4]
    assert all(isinstance(v, Exception) for v in got[4:8])
    assert got[8:] == [zarr_adapter.Missing] * 2
    assert sorted(k for k in reads if k.startswith("c/")) == ["c/0", "c/1"]

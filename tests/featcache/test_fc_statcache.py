"""Stat before hash: a rerun of extract reads only the data files whose stat (size, mtime,
ctime, inode) changed since they were hashed, as git's index does (content.StatCache)."""

import os

import numpy as np
import pytest

from ddpmseg.featcache import FeatureStore, content
from ddpmseg.pipelines.extract import extract


@pytest.fixture
def hashed(monkeypatch):
    """The files sha256_file reads, in order."""
    seen = []
    real = content.sha256_file

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(content, "sha256_file", counting)
    return seen


def _run(folder, path, cfg, backbone):
    return extract(folder, path, cfg, backbone=backbone, progress=False)


def test_unchanged_files_are_not_read_and_touched_ones_are_not_re_extracted(
        tmp_path, synthetic_dir, fake_config, fake_backbone, hashed, monkeypatch):
    monkeypatch.setattr(content, "RACY_NS", 0)  # the files were written just now (next test)
    path = tmp_path / "s.zarr"
    _run(synthetic_dir, path, fake_config, fake_backbone())
    assert len(hashed) == 8 and content.stat_cache_path(path).is_file()
    hashed.clear()
    bb = fake_backbone()
    _run(synthetic_dir, path, fake_config, bb)
    assert hashed == [] and bb.calls == 0        # nothing read, nothing extracted
    # Touched, bytes unchanged: hashed again (its stat changed), the same hash: not redone.
    image = synthetic_dir / "img001.png"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _run(synthetic_dir, path, fake_config, bb)
    assert hashed == ["img001.png"] and bb.calls == 0


def test_a_same_size_change_with_its_mtime_put_back_is_seen(
        tmp_path, synthetic_dir, fake_config, fake_backbone, hashed, monkeypatch):
    monkeypatch.setattr(content, "RACY_NS", 0)
    path = tmp_path / "s.zarr"
    _run(synthetic_dir, path, fake_config, fake_backbone())
    mask_file = synthetic_dir / "img002.npy"
    st = mask_file.stat()
    mask = np.load(mask_file)
    mask[:8] = 1
    np.save(mask_file, mask)                      # the same size: a .npy of the same shape
    os.utime(mask_file, ns=(st.st_atime_ns, st.st_mtime_ns))   # and the same mtime
    assert mask_file.stat().st_size == st.st_size
    hashed.clear()
    store = _run(synthetic_dir, path, fake_config, fake_backbone())
    # ctime moved (no program can set it back): hashed, found changed, relabelled.
    assert hashed == ["img002.npy"]
    assert (store.labels(2)[:8] == 1).all()


def test_racily_clean_files_are_hashed_until_their_stat_is_old(
        tmp_path, synthetic_dir, fake_config, fake_backbone, hashed, monkeypatch):
    path = tmp_path / "s.zarr"
    monkeypatch.setattr(content, "RACY_NS", 3_600 * 10 ** 9)  # every file is "just written"
    _run(synthetic_dir, path, fake_config, fake_backbone())
    hashed.clear()
    _run(synthetic_dir, path, fake_config, fake_backbone())
    assert len(hashed) == 8   # a change within the stat's tick could hide: read them again
    monkeypatch.setattr(content, "RACY_NS", 0)
    hashed.clear()
    _run(synthetic_dir, path, fake_config, fake_backbone())
    assert hashed == []


def test_a_damaged_stat_cache_means_hashing_everything(tmp_path, synthetic_dir, fake_config,
                                                       fake_backbone, hashed, monkeypatch):
    monkeypatch.setattr(content, "RACY_NS", 0)
    path = tmp_path / "s.zarr"
    _run(synthetic_dir, path, fake_config, fake_backbone())
    cache = content.stat_cache_path(path)
    cache.write_text(cache.read_text().replace('"files":{', '"files":{"/x":[1,2,3,4,"e"],'))
    hashed.clear()
    bb = fake_backbone()
    _run(synthetic_dir, path, fake_config, bb)
    assert len(hashed) == 8 and bb.calls == 0
    assert FeatureStore.open(path).complete().all()


def test_unchanged_files_are_not_checked_again_and_load_when_their_image_is_redone(
        tmp_path, synthetic_dir, fake_config, fake_backbone, helpers, monkeypatch):
    from ddpmseg import data

    monkeypatch.setattr(content, "RACY_NS", 0)
    path = tmp_path / "s.zarr"
    _run(synthetic_dir, path, fake_config, fake_backbone())
    want = helpers.tree_bytes(path)
    opened = []
    real = data.image_hw
    monkeypatch.setattr(data, "image_hw", lambda p, *a: opened.append(p.name) or real(p, *a))
    _run(synthetic_dir, path, fake_config, fake_backbone())
    assert opened == []                  # an unchanged folder: no image or mask opened
    FeatureStore.open(path, mode="r+").mark_incomplete(2)   # as if killed while writing it
    bb = fake_backbone()
    _run(synthetic_dir, path, fake_config, bb)
    assert opened == ["img002.png"] and bb.calls == 1   # its labels loaded (and checked) now
    assert helpers.tree_bytes(path) == want

"""Writer tokens: content that a task of an earlier extract attempt wrote into a store that
another attempt now owns is told apart (verify), refused (a guarded writer) and redone."""

import numpy as np
import pytest

from ddpmseg.core.errors import StaleWriterError
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract
from ddpmseg.featcache.store import array_name
from ddpmseg.pipelines.verify import verify_store


@pytest.fixture
def replaced(tmp_path, synthetic_dir, fake_config, fake_backbone):
    """(path, stale handle, its image-1 maps and labels): a store replaced by --overwrite
    after a handle of the first attempt was opened."""
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    stale = FeatureStore.open(path, mode="r+")
    maps, labels = stale.encode(1, stale.maps(1)), stale.labels(1)
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(scale=2.0),
            progress=False, overwrite=True)
    return path, stale, maps, labels


def test_verify_names_an_image_another_attempt_wrote_and_a_rerun_redoes_it(
        replaced, synthetic_dir, fake_config, fake_backbone):
    path, stale, maps, labels = replaced
    want = FeatureStore.open(path).maps(1)
    stale.write_image(1, maps, labels, encoded=True)  # slipped past its check
    damage = verify_store(path)
    assert [(d.what, d.where) for d in damage] == [("image 1 (img001)", "writer")]
    assert "written by another extract attempt" in damage[0].detail
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(scale=2.0),
            progress=False)
    assert verify_store(path) == []
    for got, w in zip(FeatureStore.open(path).maps(1), want):
        np.testing.assert_array_equal(got, w)


def test_maps_overwritten_without_their_record_are_damage_and_repair_redoes_them(
        replaced, synthetic_dir, fake_config, fake_backbone):
    path, stale, maps, _ = replaced
    t, b = stale.info.keys[0]
    stale._arr(array_name(t, b))[1] = maps[0]  # a chunk write that raced the new record
    damage = verify_store(path)
    assert [(d.what, d.where) for d in damage] == [("image 1 (img001)", "writer")]
    assert "not the ones its writer recorded" in damage[0].detail
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(scale=2.0),
            progress=False, repair=True)
    assert verify_store(path) == []


def test_a_guarded_writer_of_an_earlier_attempt_writes_nothing(replaced, helpers):
    path, stale, maps, labels = replaced
    stale.guard = True
    before = helpers.tree_bytes(path)
    with pytest.raises(StaleWriterError, match="another extract now owns this store"):
        stale.write_image(1, maps, labels, encoded=True)
    assert helpers.tree_bytes(path) == before


def test_overwrite_survives_a_folder_written_while_it_is_deleted(
        tmp_path, synthetic_dir, fake_config, fake_backbone, monkeypatch):
    """The reported race: a late task writes into the old store while --overwrite deletes it,
    and the deletion fails with "Directory not empty". The path is freed by a rename first."""
    from ddpmseg.pipelines import extract as extraction
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    real, calls = extraction.shutil.rmtree, []

    def racing_rmtree(target, ignore_errors=False, **kw):
        calls.append(target)
        if len(calls) == 1:  # the first deletion meets a write of a late task
            real(target, ignore_errors=True)
            (extraction.Path(target) / "c").mkdir(parents=True, exist_ok=True)
            (extraction.Path(target) / "c" / "0").write_bytes(b"late")
            if not ignore_errors:
                raise OSError(39, "Directory not empty", "c")
            return None
        return real(target, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(extraction.shutil, "rmtree", racing_rmtree)
    store = extract(synthetic_dir, path, fake_config, backbone=fake_backbone(scale=2.0),
                    progress=False, overwrite=True)
    assert store.complete().all() and verify_store(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.zarr.lock",
                                                          ".s.zarr.stat_cache.json", "s.zarr",
                                                          "synthetic"]


@pytest.mark.parametrize("per_shard", [0, 3], ids=["format2", "format3"])
def test_a_damaged_writer_record_is_reported_and_redone(tmp_path, synthetic_dir, fake_config,
                                                        fake_backbone, helpers, per_shard):
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=per_shard)
    want = FeatureStore.open(path).maps(2)
    helpers.flip_byte(path, "writer", 2, at=3 / 15)  # byte 3 of its 16
    damage = verify_store(path)
    # Format 3 keeps a shard's records in one chunk (shards of 3): images 0-2 fail with it.
    bad = [2] if per_shard == 0 else [0, 1, 2]
    assert [(d.what, d.where) for d in damage] == [(f"image {i} (img00{i})", "writer")
                                                   for i in bad]
    assert all("writer record is corrupt" in d.detail for d in damage)
    store = extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    assert verify_store(path) == [] and store.complete().all()
    for got, w in zip(store.maps(2), want):
        np.testing.assert_array_equal(got, w)

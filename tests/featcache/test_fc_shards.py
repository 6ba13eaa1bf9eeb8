"""Store formats 3 and 4: every array in shards of ``images_per_shard`` images (zarr's sharding codec).

Few files per image, whole shards written once, byte-identical whatever order and grouping the
images are written in (so a resumed, grown or repaired store equals an uninterrupted one), every
inner chunk checked, and the usual tools still open it."""

import json

import numpy as np
import pytest
import torch

from ddpmseg.core.errors import ConfigError
from ddpmseg.featcache import FeatureStore, StoreInfo
from ddpmseg.featcache.store import array_name
from ddpmseg.pipelines.extract import batches_of, extract, shard_groups
from ddpmseg.pipelines.verify import verify_store
from ddpmseg.spec import BackboneId, FeatureSpec

SHAPES = ((2, 2, 2), (1, 4, 4))


def tiny_info(n: int, per_shard: int = 64, fmt: int = 4) -> StoreInfo:
    spec = FeatureSpec(steps=(10,), blocks=(1, 2), shapes=SHAPES, image_size=(4, 4),
                       dtype="float16", backbone=BackboneId("cd" * 32, {"image_size": 4}))
    return StoreInfo(spec, num_images=n, names=tuple(f"im{k:04d}" for k in range(n)),
                     num_classes=3, ignore_label=255, images_per_shard=per_shard,
                     format_version=fmt)


def maps_of(i: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def labels_of(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 3, (4, 4)).astype(np.uint8)


def write(store: FeatureStore, indices, plan: bool = True) -> None:
    if plan:
        store.plan_writes(list(indices))
    for i in indices:
        store.write_image(i, maps_of(i), labels_of(i))
    store.flush()


def test_a_thousand_images_are_few_files_per_array(tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, tiny_info(1000))
    write(store, range(1000))
    reopened = FeatureStore.open(path)
    assert reopened.info.format_version == 4 and reopened.info.images_per_shard == 64
    assert reopened.complete().all()
    for name in ("act_t10_b1", "act_t10_b2", "labels", "writer", "complete", "image_records"):
        files = [p for p in (path / name).rglob("*") if p.is_file()]
        assert len(files) / 1000 <= 0.05, (name, len(files))   # 16 shards + zarr.json
    for i in (0, 63, 64, 999):
        np.testing.assert_array_equal(reopened.maps(i)[1], maps_of(i)[1].half().numpy())
        np.testing.assert_array_equal(reopened.labels(i), labels_of(i))


def test_any_order_and_grouping_of_writes_gives_the_same_bytes(tmp_path, helpers):
    whole, piecemeal, grown = (tmp_path / f"{k}.zarr" for k in ("whole", "piecemeal", "grown"))
    write(FeatureStore.create(whole, tiny_info(10, per_shard=4)), range(10))
    # One image at a time, unplanned (each merged into its shard), in a scrambled order.
    write(FeatureStore.create(piecemeal, tiny_info(10, per_shard=4)), [7, 2, 9, 0, 5, 1, 8, 3,
                                                                       6, 4], plan=False)
    # 6 images, then grown to 10: the partial shard of images 4-5 is rewritten when it fills.
    store = FeatureStore.create(grown, tiny_info(6, per_shard=4))
    write(store, range(6))
    info = tiny_info(10, per_shard=4)
    store.resize(10)
    store.record(info, {})
    write(store, range(6, 10))
    want = helpers.tree_bytes(whole)
    assert helpers.tree_bytes(piecemeal) == want
    got = helpers.tree_bytes(grown)
    got["zarr.json"] = want["zarr.json"]   # the attributes hold the (empty) image state
    assert got == want


def test_images_wait_for_their_shard_and_flush_writes_the_rest(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", tiny_info(6, per_shard=4))
    store.plan_writes(range(6))
    for i in range(3):
        store.write_image(i, maps_of(i), labels_of(i))
    assert not (tmp_path / "s.zarr" / "act_t10_b1" / "c").exists()   # nothing written yet
    store.write_image(3, maps_of(3), labels_of(3))   # shard 0 complete: written whole
    assert FeatureStore.open(tmp_path / "s.zarr").complete().tolist() == [True] * 4 + [False] * 2
    store.write_image(4, maps_of(4), labels_of(4))
    store.flush()   # image 5 never came: image 4 is written alone
    assert FeatureStore.open(tmp_path / "s.zarr").complete().tolist() == [True] * 5 + [False]


def test_batches_and_tasks_never_span_two_shards():
    info = tiny_info(20, per_shard=4)
    assert shard_groups(info, [1, 2, 3, 4, 9, 10, 17]) == [[1, 2, 3], [4], [9, 10], [17]]
    assert batches_of(info, [0, 1, 2, 3, 4, 5], 3) == [[0, 1, 2], [3], [4, 5]]
    assert batches_of(tiny_info(20, fmt=2), [0, 1, 2, 3, 4, 5], 4) == [[0, 1, 2, 3], [4, 5]]


def test_shard_size_must_be_positive(tmp_path, synthetic_dir, fake_config, fake_backbone):
    with pytest.raises(ConfigError, match="images per shard"):
        tiny_info(3, per_shard=0)
    with pytest.raises(ConfigError, match="images per shard"):
        extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                progress=False, images_per_shard=-1)
    assert not (tmp_path / "s.zarr").exists()


def test_a_sharded_store_opens_in_xarray_and_dask(tmp_path):
    import dask.array as da
    import xarray as xr
    import zarr

    path = tmp_path / "s.zarr"
    write(FeatureStore.create(path, tiny_info(10, per_shard=4)), range(10))
    ds = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(ds["act_t10_b2"].isel(image=7).values,
                                  maps_of(7)[1].half().numpy())
    np.testing.assert_array_equal(ds["labels"].values[9], labels_of(9))
    names = [json.loads(r)[0] for r in ds["image_records"].values]   # FORMAT.md's example
    assert names == [f"im{k:04d}" for k in range(10)]
    acts = da.from_zarr(zarr.open_group(str(path), mode="r")["act_t10_b1"])
    assert acts.shape == (10, 2, 2, 2)
    np.testing.assert_array_equal(acts[5].compute(), maps_of(5)[0].half().numpy())
    store = FeatureStore.open(path)
    np.testing.assert_array_equal(store.dask_array(10, 1)[3].compute(), store.maps(3)[0])


def test_a_sharded_store_opens_in_tensorstore(tmp_path):
    """Another zarr 3 implementation reads every array but the records as ddpmseg does:
    shards, crc32c, blosc, dimension names. tensorstore has no string data type, so
    image_records (the names) opens in zarr-python and xarray only."""
    ts = pytest.importorskip("tensorstore", reason="the test extra is not installed")
    path = tmp_path / "s.zarr"
    write(FeatureStore.create(path, tiny_info(10, per_shard=4)), range(10))
    store = FeatureStore.open(path)

    def read(name):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
        return ts.open(spec, read=True).result().read().result()

    for i in (0, 5, 9):   # a full shard and the partial last one
        for k, name in enumerate(("act_t10_b1", "act_t10_b2")):
            np.testing.assert_array_equal(read(name)[i], store.maps(i)[k])
        np.testing.assert_array_equal(read("labels")[i], labels_of(i))
    assert read("complete").tolist() == [1] * 10
    with pytest.raises(ValueError, match="string data type"):
        read("image_records")


def test_verify_checks_every_inner_chunk_and_a_damaged_index(tmp_path, helpers):
    path = tmp_path / "s.zarr"
    write(FeatureStore.create(path, tiny_info(10, per_shard=4)), range(10))
    helpers.flip_byte(path, "act_t10_b2", 5)      # shard 1, inner chunk 1
    helpers.flip_byte(path, "labels", 9, at=1)    # shard 2 (partial), its last byte
    assert [(d.what, d.where) for d in verify_store(path)] == [
        ("image 5 (im0005)", "act_t10_b2"), ("image 9 (im0009)", "labels")]
    # A shard whose index fails its crc32c: each of its images is reported.
    shard = path / "act_t10_b1" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-6] ^= 1
    shard.write_bytes(bytes(raw))
    damaged = [(d.what, d.where) for d in verify_store(path)]
    assert [w for w in damaged if w[1] == "act_t10_b1"] == [
        (f"image {i} (im000{i})", "act_t10_b1") for i in range(4)]


def test_sharded_repair_rewrites_the_shard_from_its_good_images(tmp_path, synthetic_dir,
                                                               fake_config, fake_backbone,
                                                               helpers):
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=2)
    before = helpers.tree_bytes(path)
    shard = path / "act_t50_b2" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-6] ^= 1                                   # shard 1's index (images 2, 3)
    shard.write_bytes(bytes(raw))
    helpers.flip_byte(path, "act_t5_b1", 0)       # and image 0's chunk in shard 0
    bb = fake_backbone()
    extract(synthetic_dir, path, fake_config, backbone=bb, progress=False, repair=True)
    assert bb.calls == 3   # images 0, 2 and 3 (one image per batch)
    assert helpers.tree_bytes(path) == before
    assert verify_store(path) == []


def test_a_sharded_store_grows_across_shards_equal_to_scratch(tmp_path, synthetic_dir, fake_config,
                                                       fake_backbone, helpers):
    grown, scratch = tmp_path / "grown.zarr", tmp_path / "scratch.zarr"
    extract(synthetic_dir, scratch, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=3)
    held = tmp_path / "held"
    held.mkdir()
    for stem in ("img002", "img003"):   # the folder had two images, then four
        for suffix in (".png", ".npy"):
            (synthetic_dir / f"{stem}{suffix}").rename(held / f"{stem}{suffix}")
    extract(synthetic_dir, grown, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=3)
    for p in held.iterdir():
        p.rename(synthetic_dir / p.name)
    extract(synthetic_dir, grown, fake_config, backbone=fake_backbone(), progress=False)
    got, want = helpers.tree_bytes(grown), helpers.tree_bytes(scratch)
    assert sorted(got) == sorted(want)
    assert [k for k in got if got[k] != want[k] and k != "zarr.json"] == []
    meta = json.loads(got["zarr.json"])["attributes"]["ddpmseg"]
    assert meta["images_per_shard"] == 3 and meta["format_version"] == 4


def test_a_format2_store_stays_format2_when_it_grows(tmp_path, synthetic_dir, fake_config,
                                                      fake_backbone):
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=0)
    store = extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    assert store.info.format_version == 2 and store.info.images_per_shard == 0
    assert (path / array_name(5, 1) / "c" / "3").is_dir()   # one chunk file per image

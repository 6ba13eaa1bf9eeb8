"""The store on its own: dtypes, checksums, completeness, lazy reading (synthetic arrays)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmseg.core.errors import (
    BadInputError,
    FeatureOverflowError,
    NotInStoreError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.featcache import FeatureStore, StoreInfo
from ddpmseg.spec import BackboneId
from ddpmseg.featcache.integrity import attrs_digest
from ddpmseg.cli.common import as_flags
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import DEFAULT_CODEC, array_name, decode_map, encode_map

SHAPES = ((6, 4, 4), (3, 8, 8), (6, 4, 4), (3, 8, 8))


def make_spec(dtype="float16", **kw):
    fields = dict(steps=(10, 20), blocks=(1, 2), shapes=SHAPES, image_size=(16, 16),
                  dtype=dtype, backbone=BackboneId("ab" * 32, {"image_size": 16}))
    return FeatureSpec(**{**fields, **kw})


def make_info(dtype="float16", n=3, has_labels=True, **kw):
    return StoreInfo(make_spec(dtype), num_images=n, names=tuple(f"im{k}" for k in range(n)),
                     num_classes=3, ignore_label=255, has_labels=has_labels, **kw)


def random_maps(seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def random_labels(seed):
    return np.random.default_rng(seed).integers(0, 3, (16, 16)).astype(np.uint8)


def filled_store(path, dtype="float16", n=3, written=None, **info):
    store = FeatureStore.create(path, make_info(dtype, n, **info))
    for i in (range(n) if written is None else written):
        store.write_image(i, random_maps(i), random_labels(i))
    return store


# The tests that damage one image's chunk file use format 2 (one file per image per array);
# test_fc_shards.py damages format 3's inner chunks.
FORMAT2 = {"format_version": 2}


def chunk_file(store_path: Path, name: str, i: int) -> Path:
    arr = FeatureStore.open(store_path)._arr(name)
    key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
    return store_path / name / key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip(tmp_path, dtype):
    filled_store(tmp_path / "s.zarr", dtype)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert len(store) == 3 and store.names == ("im0", "im1", "im2")
    assert store.complete().all()
    assert store.info.dtype == dtype and store.info.feature_dim == 18
    assert store.info.keys == [(10, 1), (10, 2), (20, 1), (20, 2)]
    for i in range(3):
        want = random_maps(i)
        got = store.maps(i)
        for g, w in zip(got, want):
            if dtype == "float16":
                assert g.dtype == np.float16 and np.array_equal(g, w.half().numpy())
            elif dtype == "bfloat16":
                assert g.dtype == np.float32
                assert np.array_equal(g, w.bfloat16().float().numpy())
            else:
                assert g.dtype == np.float32 and np.array_equal(g, w.numpy())
        np.testing.assert_array_equal(store.labels(i), random_labels(i))


def test_bfloat16_is_stored_as_uint16_and_documented(tmp_path):
    filled_store(tmp_path / "s.zarr", "bfloat16")
    meta = json.loads((tmp_path / "s.zarr" / "act_t10_b1" / "zarr.json").read_text())
    assert meta["data_type"] == "uint16"
    assert "uint16 bit patterns" in meta["attributes"]["encoding"]
    x = torch.tensor([1.0, -2.5, 3.0e38, 1e-30])
    bits = encode_map(x, "bfloat16")
    assert bits.dtype == np.uint16
    assert np.array_equal(decode_map(bits, "bfloat16"), x.bfloat16().float().numpy())


@pytest.mark.parametrize("fmt", [2, 3])
def test_metadata_has_codec_and_checksum(tmp_path, fmt):
    store = filled_store(tmp_path / "s.zarr", n=1, format_version=fmt)
    meta = json.loads((tmp_path / "s.zarr" / "act_t10_b1" / "zarr.json").read_text())
    codecs = meta["codecs"]
    if fmt == 3:  # the shards' inner chunks have the codecs, the shard index its own crc32c
        (shard,) = codecs
        assert shard["name"] == "sharding_indexed"
        assert shard["configuration"]["chunk_shape"] == [1, 6, 4, 4]
        assert [c["name"] for c in shard["configuration"]["index_codecs"]][-1] == "crc32c"
        codecs = shard["configuration"]["codecs"]
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 1
    meta["codecs"] = codecs
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == "crc32c" and "blosc" in names
    blosc = next(c for c in meta["codecs"] if c["name"] == "blosc")["configuration"]
    assert blosc["cname"] == DEFAULT_CODEC["cname"] and blosc["clevel"] == DEFAULT_CODEC["clevel"]
    assert blosc["shuffle"] == DEFAULT_CODEC["shuffle"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 6, 4, 4]
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert StoreInfo.from_json(attrs["ddpmseg"]) == store.info


def test_float16_overflow_raises_and_leaves_the_image_incomplete(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_info("float16"))
    maps = random_maps(0)
    maps[2][0, 1, 1] = 7.0e4  # > 65504: would be inf in float16
    with pytest.raises(FeatureOverflowError) as err:
        store.write_image(0, maps, random_labels(0))
    assert "image 0 (im0)" in str(err.value) and "t=20 block=1" in str(err.value)
    assert "`dtype=bfloat16`" in str(err.value)   # the CLI says --dtype bfloat16
    assert "--dtype bfloat16" in as_flags(str(err.value))
    assert not FeatureStore.open(tmp_path / "s.zarr").complete()[0]
    # 65504 itself fits; the same map in a bfloat16 store is fine.
    ok = random_maps(0)
    ok[0][0, 0, 0] = 65504.0
    store.write_image(0, ok, random_labels(0))
    bf = FeatureStore.create(tmp_path / "b.zarr", make_info("bfloat16"))
    bf.write_image(0, maps, random_labels(0))
    assert bf.maps(0)[2][0, 1, 1] == pytest.approx(7.0e4, rel=1e-2)


def test_non_finite_activation_raises(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_info("float32"))
    maps = random_maps(0)
    maps[1][0, 0, 0] = float("nan")
    with pytest.raises(FeatureOverflowError, match="NaN or infinite"):
        store.write_image(0, maps, random_labels(0))


def test_corrupted_chunk_is_an_error_naming_the_image(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, **FORMAT2)
    f = chunk_file(path, "act_t20_b2", 1)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    store = FeatureStore.open(path)
    with pytest.raises(StoreError) as err:
        store.maps(1)
    msg = str(err.value)
    assert "image 1 (im1)" in msg and "act_t20_b2" in msg and "corrupt" in msg
    with pytest.raises(StoreError, match=r"image 1 \(im1\)"):
        store.pixel_features(1, [0], [0])
    # Other images are untouched, and reading them never reads image 1's chunks.
    assert len(store.maps(0)) == 4 and len(store.maps(2)) == 4


def test_corrupted_label_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, **FORMAT2)
    f = chunk_file(path, "labels", 2)
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01  # the checksum itself
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"image 2 \(im2\).*labels"):
        FeatureStore.open(path).labels(2)


def test_missing_chunk_of_a_complete_image(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, **FORMAT2)
    chunk_file(path, "act_t10_b1", 0).unlink()
    store = FeatureStore.open(path)
    assert store.complete()[0]
    with pytest.raises(StoreError) as err:
        store.maps(0)
    assert "image 0 (im0)" in str(err.value) and "missing" in str(err.value)
    assert store.missing_chunks(0) == ["act_t10_b1"]
    assert store.missing_chunks(1) == []


def test_truncated_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, **FORMAT2)
    f = chunk_file(path, "act_t10_b2", 2)
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(StoreError, match=r"image 2 \(im2\)"):
        FeatureStore.open(path).maps(2)


def test_incomplete_image_is_never_read(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, written=[0, 2])
    store = FeatureStore.open(path)
    assert store.complete().tolist() == [True, False, True]
    with pytest.raises(StoreError, match=r"image 1 \(im1\) is not complete"):
        store.maps(1)
    with pytest.raises(StoreError, match="not complete"):
        store.labels(1)


def test_all_zero_maps_are_still_written(tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, make_info("float16", n=1))
    store.write_image(0, [torch.zeros(s) for s in SHAPES], np.full((16, 16), 255, np.uint8))
    assert store.missing_chunks(0) == []
    assert all(not m.any() for m in FeatureStore.open(path).maps(0))


def test_prediction_only_store(tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, make_info(has_labels=False, n=2))
    store.write_image(0, random_maps(0))
    assert not (path / "labels").exists()
    reopened = FeatureStore.open(path)
    assert not reopened.info.has_labels
    with pytest.raises(StoreError, match="no labels"):
        reopened.labels(0)
    assert len(reopened.maps(0)) == 4


def test_dask_arrays_are_lazy_and_match(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, "bfloat16", **FORMAT2)
    store = FeatureStore.open(path)
    arr = store.dask_array(20, 1)
    assert arr.shape == (3, 6, 4, 4) and arr.chunksize == (1, 6, 4, 4)
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr[1].compute(), store.maps(1)[2])
    labels = store.dask_labels()
    np.testing.assert_array_equal(labels[2].compute(), store.labels(2))
    # Lazy: image 0's chunk is damaged, yet computing image 2 works (only its chunk is read).
    f = chunk_file(path, "act_t20_b1", 0)
    f.write_bytes(b"garbage")
    np.testing.assert_array_equal(store.dask_array(20, 1)[2].compute(), store.maps(2)[2])
    with pytest.raises(NotInStoreError, match="has no activation for step 30, block 1") as err:
        store.dask_array(30, 1)
    assert isinstance(err.value, KeyError) and "steps 10,20 and blocks 1,2" in str(err.value)
    with pytest.raises(NotInStoreError):
        store.map(0, 20, 7)


def test_a_map_of_the_wrong_rank_is_a_bad_input():
    from ddpmseg.featcache import pixels

    with pytest.raises(BadInputError, match=r"must be \(C, h, w\), got \(4, 4\)"):
        pixels.pixel_features([np.zeros((4, 4), np.float32)], (8, 8), [0], [0])


def test_pixel_features_of_a_float32_store_equal_its_maps(tmp_path):
    from ddpmseg.featcache import pixels

    filled_store(tmp_path / "s.zarr", "float32")
    store = FeatureStore.open(tmp_path / "s.zarr")
    ys, xs = torch.tensor([0, 5, 15]), torch.tensor([3, 15, 0])
    want = pixels.pixel_features(random_maps(1), (16, 16), ys, xs)
    assert torch.equal(store.pixel_features(1, ys, xs), want)
    assert torch.equal(store.dense_rows(1, 2, 4), pixels.dense_rows(random_maps(1), (16, 16), 2, 4))


def test_differences_name_what_changed():
    a = make_info()
    spec = make_spec(steps=(10, 30), seed=3, backbone=BackboneId("cd" * 32, {"image_size": 32}))
    b = dataclasses.replace(a, spec=spec, names=("im0", "im1", "x"))
    text = "; ".join(a.differences(b))
    for part in ("steps (10,20 here, 10,30 in the store)", "seed (0 here, 3 in the store)",
                 "names", "new: im2", "not in the data folder: x",
                 "checkpoint sha256 (abababababab... here, cdcdcdcdcdcd... in the store)",
                 "image_size (16 here, 32 in the store)"):
        assert part in text
    assert a.differences(a) == []
    # The spec alone: fields can be left out or singled out (predict tolerates a seed).
    assert a.spec.differences(spec, ignore=("steps", "seed", "backbone")) == []
    assert a.spec.differences(spec, "in the run", "in the store", only=("seed",)) == [
        "seed (0 in the run, 3 in the store)"]
    # Shapes alone are named as such (they follow from the model and blocks otherwise).
    other_shapes = make_spec(shapes=SHAPES[:3] + ((4, 8, 8),))
    assert a.spec.differences(other_shapes) == [
        "native shapes ((6, 4, 4),(3, 8, 8),(6, 4, 4),(3, 8, 8) here, "
        "(6, 4, 4),(3, 8, 8),(6, 4, 4),(4, 8, 8) there)"]


def test_format_1_attributes_read_and_write_back_unchanged():
    """A store written before FeatureSpec existed: its flat attribute object is the spec's
    and the info's fields, and writing the info gives the same object back, key order too."""
    raw = {"steps": [50, 150], "blocks": [2, 4], "shapes": [[8, 16, 16], [8, 32, 32],
                                                             [8, 16, 16], [8, 32, 32]],
           "image_size": [64, 64], "num_images": 2, "names": ["a", "b"], "num_classes": 34,
           "ignore_label": 255, "class_names": [], "has_labels": True, "dtype": "float16",
           "seed": 0, "fingerprint": {"sha256": "ab" * 32, "flags": {"image_size": 64,
                                                                      "channel_mult": [1, 2]}},
           "codec": dict(DEFAULT_CODEC), "format_version": 1, "precision": "fp32",
           "min_class_pixels": 20}
    info = StoreInfo.from_json(raw)
    assert info.spec.backbone == BackboneId("ab" * 32, {"image_size": 64, "channel_mult": (1, 2)})
    assert info.steps == (50, 150) and info.shapes[1] == (8, 32, 32) and info.feature_dim == 32
    assert json.dumps(info.to_json()) == json.dumps(raw)


def test_backbone_id_names_random_models_once():
    assert BackboneId.random(7).random_seed == 7
    assert BackboneId("ab" * 32).random_seed is None
    assert BackboneId.from_json(BackboneId.random(3, {"a": (1, 2)}).to_json()) == \
        BackboneId("random-3", {"a": [1, 2]})


def test_open_rejects_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="nothing does not exist"):
        FeatureStore.open(tmp_path / "nothing")
    import zarr

    zarr.create_group(store=str(tmp_path / "other"), zarr_format=3)
    with pytest.raises(StoreError, match="not a ddpmseg feature store"):
        FeatureStore.open(tmp_path / "other")


def test_create_refuses_an_existing_store(tmp_path):
    filled_store(tmp_path / "s.zarr", n=1)
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(tmp_path / "s.zarr", make_info(n=1))


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    filled_store(path, n=1)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["ddpmseg"]["format_version"] = 99
    # as a newer ddpmseg would write it: with the digest of its attributes
    meta["attributes"]["ddpmseg_digest"] = attrs_digest(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreMismatchError, match="format 99"):
        FeatureStore.open(path)


def test_writes_from_threads_touch_only_their_images(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, make_info(n=6))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: store.write_image(i, random_maps(i), random_labels(i)), range(6)))
    reopened = FeatureStore.open(path)
    assert reopened.complete().all()
    for i in range(6):
        assert np.array_equal(reopened.maps(i)[3], random_maps(i)[3].half().numpy())
    assert array_name(10, 1) == "act_t10_b1"

"""Issue 17 on the store side: checksums of attributes and array metadata, damaged flags,
non-finite maps, verify, extract --repair and --overwrite of partial stores, locks, input
edge cases (16-bit images, tiny masks, decompression bombs, hints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg import data
from ddpmseg.cli.main import cli
from ddpmseg.core.errors import BadInputError, StoreError
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract
from ddpmseg.core.locking import LockedError, lock_path, writer_lock
from ddpmseg.pipelines.verify import verify_store


# Format 2 (one file per image per array), format 3 (an older sharded store: names and state
# in the attributes) and format 4 (the default: in the image_records array), sharded in 3s (a
# full shard and a partial one, for the 4 images of synthetic_dir).
@pytest.fixture(params=[2, 3, 4], ids=["format2", "format3", "format4"])
def made(request, tmp_path, monkeypatch, synthetic_dir, fake_config, fake_backbone, helpers):
    from ddpmseg.pipelines import extract as extract_mod

    if request.param == 3:   # no longer made: what extract made before format 4
        monkeypatch.setattr(extract_mod, "FORMAT_VERSION", 3)
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=0 if request.param == 2 else 3)
    assert FeatureStore.open(path).info.format_version == request.param
    return path, helpers.tree_bytes(path)


def _rerun(made_path, synthetic_dir, fake_config, fake_backbone, **kw):
    return extract(synthetic_dir, made_path, fake_config, backbone=fake_backbone(),
                   progress=False, **kw)


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_changed_attributes_are_refused_naming_the_file(made):
    path, _ = made
    _edit_json(path / "zarr.json",
               lambda m: m["attributes"]["ddpmseg"].__setitem__("num_classes", 4))
    with pytest.raises(StoreError, match=r"s\.zarr/zarr\.json: the store's attributes do not "
                                         r"match their checksum"):
        FeatureStore.open(path)


def test_changed_array_metadata_is_refused_naming_the_array(made):
    path, _ = made
    meta_file = path / "act_t5_b1" / "zarr.json"

    def big_endian(m):
        codecs = m["codecs"]
        if codecs[0]["name"] == "sharding_indexed":  # format 3: the inner chunks' codecs
            codecs = codecs[0]["configuration"]["codecs"]
        codecs[0]["configuration"]["endian"] = "big"
    _edit_json(meta_file, big_endian)
    with pytest.raises(StoreError, match=r"act_t5_b1/zarr\.json: codecs differ"):
        FeatureStore.open(path)
    meta_file.write_bytes(b"{not json")
    with pytest.raises(StoreError, match=r"act_t5_b1/zarr\.json is unreadable"):
        FeatureStore.open(path)
    [damage] = verify_store(path)
    assert damage.what == "store" and "act_t5_b1/zarr.json" in damage.detail


def test_a_damaged_complete_flag_counts_as_incomplete_and_a_rerun_repairs_it(
        made, synthetic_dir, fake_config, fake_backbone, helpers):
    path, before = made
    helpers.flip_byte(path, "complete", 2, at=0, bit=1)
    store = FeatureStore.open(path)
    # Format 3 keeps the flags of a shard's images in one chunk (shards of 3 here): its
    # checksum fails for images 0-2, which are redone.
    bad = [2] if store.info.format_version == 2 else [0, 1, 2]
    assert store.complete().tolist() == [i not in bad for i in range(4)]
    assert store.damaged_flags() == bad
    assert [(d.what, d.where) for d in verify_store(path)] == [
        (f"image {i} (img00{i})", "complete") for i in bad]
    _rerun(path, synthetic_dir, fake_config, fake_backbone)
    assert helpers.tree_bytes(path) == before


def test_repair_re_extracts_exactly_the_damaged_images(made, synthetic_dir, fake_config,
                                                       fake_backbone, helpers):
    path, before = made
    helpers.flip_byte(path, "act_t50_b2", 1)
    store = FeatureStore.open(path)
    with pytest.raises(StoreError, match=r"image 1 \(img001\): the chunk of act_t50_b2 is "
                                         r"corrupt.*`repair=True`"):
        store.maps(1)
    assert [(d.what, d.where) for d in verify_store(path)] == [("image 1 (img001)",
                                                                "act_t50_b2")]
    # A plain rerun trusts complete images; --repair reads them and redoes image 1 only.
    bb = fake_backbone()
    _rerun(path, synthetic_dir, fake_config, lambda: bb)
    assert bb.calls == 0
    _rerun(path, synthetic_dir, fake_config, lambda: bb, repair=True)
    assert bb.calls == 1
    assert helpers.tree_bytes(path) == before
    assert verify_store(path) == []


def test_non_finite_maps_never_reach_a_reader(made):
    path, _ = made
    store = FeatureStore.open(path, "r+")
    maps = [np.asarray(m) for m in store.maps(0)]
    maps[1] = maps[1].copy()
    maps[1][0, 0, 0] = np.nan
    store.write_image(0, maps, store.labels(0), encoded=True)
    with pytest.raises(StoreError, match=r"image 0 \(img000\): the chunk of act_t5_b2 holds 1 "
                                         r"NaN or infinite"):
        FeatureStore.open(path).maps(0)
    assert [d.where for d in verify_store(path)] == ["act_t5_b2"]


def test_overwrite_replaces_a_partial_store(tmp_path, synthetic_dir, fake_config,
                                            fake_backbone, made, helpers):
    path, before = made
    per = FeatureStore.open(path).info.images_per_shard   # new stores made as that one
    # A writer killed while writing the group's zarr.json leaves only zarr's temporary file:
    # a rerun starts over (nothing to keep), with or without --overwrite.
    partial = tmp_path / "p.zarr"
    partial.mkdir()
    (partial / f"zarr.json.{'ab' * 16}.partial").write_text("{")
    _rerun(partial, synthetic_dir, fake_config, fake_backbone, images_per_shard=per)
    assert helpers.tree_bytes(partial) == before
    # A store whose zarr.json is damaged: refused, then replaced by --overwrite.
    (partial / "zarr.json").write_bytes(b"\x00garbage")
    with pytest.raises(StoreError, match="zarr.json is unreadable.*`overwrite=True`"):
        _rerun(partial, synthetic_dir, fake_config, fake_backbone)
    _rerun(partial, synthetic_dir, fake_config, fake_backbone, overwrite=True,
           images_per_shard=per)
    assert helpers.tree_bytes(partial) == before
    # A folder holding anything else is never replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.json").write_bytes(b"{}")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a ddpmseg feature store"):
        _rerun(other, synthetic_dir, fake_config, fake_backbone, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, synthetic_dir, fake_config,
                                                      fake_backbone):
    path = tmp_path / "s.zarr"
    with writer_lock(path):
        with pytest.raises(LockedError, match=rf"being written by process {os.getpid()}"):
            _rerun(path, synthetic_dir, fake_config, fake_backbone)
    assert not path.exists()  # refused before anything was written


def test_a_killed_writers_lock_never_blocks(tmp_path, synthetic_dir, fake_config,
                                            fake_backbone):
    path = tmp_path / "s.zarr"
    code = ("import os, sys; from ddpmseg.core.locking import writer_lock\n"
            f"with writer_lock({str(path)!r}):\n    os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ})
    assert proc.returncode == -9 and lock_path(path).is_file()
    _rerun(path, synthetic_dir, fake_config, fake_backbone)
    assert FeatureStore.open(path).complete().all()


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = data.load_image(tmp_path / "g16.png")
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert got.shape == (64, 64, 3)
    np.testing.assert_array_equal(got[..., 0], want)
    np.testing.assert_array_equal(got[..., 2], want)


def test_tiny_masks_are_masks(tmp_path):
    np.save(tmp_path / "one.npy", np.array([[3]], dtype=np.uint8))
    np.save(tmp_path / "row.npy", np.array([[1, 2, 0, 5]], dtype=np.uint8))
    Image.fromarray(np.array([[7]], dtype=np.uint8)).save(tmp_path / "one.png")
    assert data.read_mask(tmp_path / "one.npy").tolist() == [[3]]
    assert data.read_mask(tmp_path / "row.npy").tolist() == [[1, 2, 0, 5]]
    assert data.read_mask(tmp_path / "one.png").tolist() == [[7]]


def test_a_decompression_bomb_is_one_line_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 > 2 x 700: PIL's error
    with pytest.raises(BadInputError, match="more than 1400 pixels, above the limit of 700 .*"
                                            "`max_image_pixels=700`"):
        data.load_image(tmp_path / "big.png")
    assert data.load_image(tmp_path / "big.png", max_image_pixels=10_000).shape == (40, 40, 3)


def test_mask_size_hint_fits_the_command(tmp_path, synthetic_dir, fake_config, fake_backbone):
    np.save(synthetic_dir / "img000.npy", np.zeros((16, 16), np.uint8))
    for resize in (False, True):
        with pytest.raises(BadInputError) as err:
            extract(synthetic_dir, tmp_path / f"s{resize}.zarr", fake_config,
                    backbone=fake_backbone(), progress=False, resize=resize)
        assert "--resize" not in err.value.hint
        assert "size of its image" in err.value.hint


def test_verify_command_lists_damage_and_exits_non_zero(made, helpers):
    path, _ = made
    ok = CliRunner().invoke(cli, ["verify", str(path)])
    assert ok.exit_code == 0 and "sound" in ok.stdout
    helpers.flip_byte(path, "labels", 3, at=1, bit=4)
    bad = CliRunner().invoke(cli, ["verify", str(path)])
    assert bad.exit_code == 1
    assert bad.stdout.splitlines()[0].startswith("image 3 (img003)\tlabels\t")
    assert len(bad.stdout.splitlines()) == 1


def test_the_store_remembers_its_config_under_the_digest(tmp_path, synthetic_dir, fake_config,
                                                          fake_backbone):
    cfg = fake_config.replace(data={"name": "synthetic_3", "class_names": ("a", "b", "c")},
                                     classifier={"etf": "none", "ensemble": 3})
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, cfg, backbone=fake_backbone(), progress=False)
    got = FeatureStore.open(path).recorded_config()
    assert got.data == cfg.data and got.classifier == cfg.classifier
    # The config is under the attributes' digest: an edited [classifier] is refused.
    _edit_json(path / "zarr.json",
               lambda m: m["attributes"]["config"]["classifier"].__setitem__("ensemble", 10))
    with pytest.raises(StoreError, match="do not match their checksum"):
        FeatureStore.open(path)


def test_a_store_without_a_recorded_config_reads(tmp_path, synthetic_dir, fake_config,
                                                 fake_backbone):
    from ddpmseg.featcache.integrity import DIGEST_KEY, attrs_digest

    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)

    def drop(m):  # as a store written before the config attribute, digest recomputed
        del m["attributes"]["config"]
        m["attributes"][DIGEST_KEY] = attrs_digest(m["attributes"])
    _edit_json(path / "zarr.json", drop)
    store = FeatureStore.open(path)
    assert store.recorded_config() is None and store.info.num_classes == 3

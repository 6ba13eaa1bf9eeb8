"""Format 4 (the default): the images' names and state in the image_records array, not the
group attributes. Appending an image rewrites one records chunk; a kill before the attributes'
commit resumes to the same bytes; a damaged records chunk is named on open."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from ddpmseg.core.errors import StoreError
from ddpmseg.featcache import FeatureStore, StoreInfo, content
from ddpmseg.featcache.store import IMAGES_ATTR
from ddpmseg.spec import BackboneId, FeatureSpec

SPEC = FeatureSpec(steps=(10,), blocks=(1,), shapes=((2, 2, 2),), image_size=(4, 4),
                   dtype="float16", backbone=BackboneId("ab" * 32, {"image_size": 4}))


def _hashes(names):
    return {n: [hashlib.sha256(n.encode()).hexdigest(), None] for n in names}


def _names(n):
    return tuple(f"img{k:04d}" for k in range(n))


def _make(path, n, version=4):
    info = StoreInfo(SPEC, num_images=n, names=_names(n), num_classes=3, ignore_label=255,
                     has_labels=False, format_version=version, images_per_shard=4)
    store = FeatureStore.create(path, info)
    content.write_state(store, store.info, content.ImageState(_hashes(_names(n))))
    return FeatureStore.open(path, mode="r+")


def _append(store, k=1):
    names = list(store.names) + [f"new{j}" for j in range(k)]
    content.apply(store, content.plan(store, _hashes(names), prune=False), {})


def test_names_and_state_live_in_records(tmp_path):
    store = _make(tmp_path / "s.zarr", 6)
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert "names" not in attrs["ddpmseg"] and IMAGES_ATTR not in attrs
    assert store.names == _names(6) and store.info.num_images == 6
    assert content.read_state(store).hashes == _hashes(_names(6))
    _append(store, 2)
    again = FeatureStore.open(tmp_path / "s.zarr")
    assert again.names == _names(6) + ("new0", "new1")
    assert content.image_set(again) == _hashes(again.names)


@pytest.mark.parametrize("version", [3, 4])
def test_append_cost(tmp_path, count_writes, version):
    """Bytes written by one append: O(pool) in the attributes (format 3), the same for 10 and
    200 images with records (format 4)."""
    cost = {}
    for n in (10, 200):
        store = _make(tmp_path / f"s{n}.zarr", n, version)
        with count_writes() as written:
            _append(store)
        cost[n] = sum(written.values())
        if version == 4:
            assert f"image_records/c/{n // 4}" in written
            assert not [k for k in written if k.startswith("image_records/c/")
                        and k != f"image_records/c/{n // 4}"]
    if version == 4:
        # (the last chunk holds 2 records at 10 images, 0 at 200: within one chunk's worth)
        assert cost[200] < cost[10] + 4 * 150, cost
    else:
        assert cost[200] > cost[10] + 190 * 64, cost   # every name and hash again


def test_kill_before_commit_resumes_to_same_bytes(tmp_path, monkeypatch, helpers):
    whole = _make(tmp_path / "a.zarr", 5)
    _append(whole, 2)
    cut = _make(tmp_path / "b.zarr", 5)

    def killed(self, changes):
        raise KeyboardInterrupt   # the records are written, the attributes are not

    monkeypatch.setattr(FeatureStore, "update_attrs", killed)
    with pytest.raises(KeyboardInterrupt):
        _append(cut, 2)
    monkeypatch.undo()
    reopened = FeatureStore.open(tmp_path / "b.zarr", mode="r+")
    assert reopened.names == _names(5)   # records past num_images are not the store's yet
    _append(reopened, 2)
    assert helpers.tree_bytes(tmp_path / "a.zarr") == helpers.tree_bytes(tmp_path / "b.zarr")


def test_kill_while_creating_resumes(tmp_path, monkeypatch, helpers):
    _make(tmp_path / "a.zarr", 5)
    monkeypatch.setattr(FeatureStore, "update_attrs", lambda self, c: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    info = StoreInfo(SPEC, num_images=5, names=_names(5), num_classes=3, ignore_label=255,
                     has_labels=False, format_version=4, images_per_shard=4)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore.create(tmp_path / "b.zarr", info)
    monkeypatch.undo()
    empty = FeatureStore.open(tmp_path / "b.zarr", mode="r+")
    assert len(empty) == 0 and empty.names == ()
    content.apply(empty, content.plan(empty, _hashes(_names(5)), prune=False), {})
    assert helpers.tree_bytes(tmp_path / "a.zarr") == helpers.tree_bytes(tmp_path / "b.zarr")


def test_damaged_records_chunk_is_named_on_open(tmp_path):
    _make(tmp_path / "s.zarr", 6)
    f = tmp_path / "s.zarr" / "image_records" / "c" / "1"
    raw = bytearray(f.read_bytes())
    raw[3] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"image_records/c/1: the image records are damaged"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_compact_keeps_format4(tmp_path):
    store = _make(tmp_path / "s.zarr", 3)
    for i in range(3):
        store.write_image(i, [np.zeros((2, 2, 2), np.float32)])
    store.flush()
    keep = list(store.names[1:])
    content.apply(store, content.plan(store, _hashes(keep), prune=True), {})
    new = content.compact(FeatureStore.open(tmp_path / "s.zarr", mode="r+"))
    assert new.info.format_version == 4 and new.names == tuple(keep)
    assert content.read_state(new).hashes == _hashes(keep)


def test_format4_on_an_fsspec_url(tmp_path):
    """The records are a zarr array, so a URL store holds them like any other array."""
    url = f"memory://format4/{tmp_path.name}/s.zarr"
    store = _make(url, 5)
    _append(store, 1)
    again = FeatureStore.open(url)
    assert again.names == _names(5) + ("new0",)
    assert content.image_set(again) == _hashes(again.names)


def test_extract_grows_a_format4_store_equal_to_scratch(tmp_path, synthetic_dir, fake_config,
                                                        fake_backbone, helpers):
    """extract (format 4 by default): a store grown by one image equals one extracted from
    scratch, byte for byte; verify reports a damaged records chunk by its file."""
    import shutil

    from ddpmseg.pipelines import extract as extract_mod
    from ddpmseg.pipelines.verify import verify_store

    part = tmp_path / "part"
    part.mkdir()
    for f in sorted(synthetic_dir.iterdir()):
        if not f.name.startswith("img003"):
            shutil.copy(f, part / f.name)

    def run(folder, path):
        extract_mod.extract(folder, path, fake_config, backbone=fake_backbone(),
                            progress=False, images_per_shard=2)

    run(part, tmp_path / "grown.zarr")
    assert FeatureStore.open(tmp_path / "grown.zarr").info.format_version == 4
    for f in synthetic_dir.glob("img003*"):
        shutil.copy(f, part / f.name)
    run(part, tmp_path / "grown.zarr")
    run(synthetic_dir, tmp_path / "scratch.zarr")
    grown = helpers.tree_bytes(tmp_path / "grown.zarr")
    assert grown == helpers.tree_bytes(tmp_path / "scratch.zarr")
    assert "image_records/c/1" in grown
    assert FeatureStore.open(tmp_path / "grown.zarr").names == _names_of(synthetic_dir)
    assert verify_store(tmp_path / "grown.zarr") == []
    f = tmp_path / "grown.zarr" / "image_records" / "c" / "1"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01   # its crc32c
    f.write_bytes(bytes(raw))
    damage = verify_store(tmp_path / "grown.zarr")
    assert len(damage) == 1 and "image_records/c/1" in str(damage[0])
    # The command: one line naming the file, what is wrong and the option that fixes it.
    from click.testing import CliRunner

    from ddpmseg.cli.main import cli
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "grown.zarr")])
    assert res.exit_code == 1
    (line,) = [x for x in res.stdout.splitlines() if x]
    assert line.endswith("image_records/c/1: the image records are damaged (they fail their "
                         "checksum or cannot be decoded); records cannot be repaired; "
                         "re-extract the store with the same command plus --overwrite"), line


def _names_of(folder):
    return tuple(sorted(p.stem for p in folder.glob("*.png")))


KILL_SCRIPT = """
import os, signal, sys
from ddpmseg.config import Config
from ddpmseg.featcache import image_records
from ddpmseg.pipelines.extract import extract

data, store, ckpt, kill = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "kill"
if kill:   # SIGKILL right after the records are written, before the attributes commit them
    real = image_records.write

    def write(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    image_records.write = write
cfg = Config().replace(data={"num_classes": 34}, model={"preset": "faces_64"},
                       features={"steps": (10,), "blocks": (2, 5)})
extract(data, store, cfg, ckpt, progress=False, images_per_shard=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["create", "grow"])
def test_sigkill_between_records_and_commit_resumes_byte_identical(
        tmp_path, when, faces, faces64_ckpt, helpers):
    """A real extract process SIGKILLed after writing records the attributes do not count yet
    (while creating the store, or while growing it by three images) reruns to the bytes of an
    uninterrupted run."""
    import subprocess
    import sys

    first = faces[:2] if when == "grow" else faces[:5]
    folder = helpers.make_folder(tmp_path / "data", [f[1] for f in first],
                                 [f[2] for f in first], [f[0] for f in first])
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    killed, full = tmp_path / "killed.zarr", tmp_path / "full.zarr"

    def run(path, kill=False):
        proc = subprocess.run([sys.executable, str(script), str(folder), str(path),
                               str(faces64_ckpt), "kill" if kill else "-"], capture_output=True)
        if kill:
            assert proc.returncode == -9, proc.stderr.decode()
        else:
            assert proc.returncode == 0, proc.stderr.decode()

    if when == "grow":   # both stores had two images, then five
        run(killed)
        run(full)
        for name, image, mask in faces[2:5]:
            helpers.make_folder(folder, [image], [mask], [name])
    run(killed, kill=True)
    if when == "grow":   # the new records are written, not yet counted
        assert len(FeatureStore.open(killed)) == 2
        assert (killed / "image_records" / "c" / "1").exists()
    else:   # a new local store is made beside its path and renamed into place
        assert not killed.exists()
        [half] = tmp_path.glob(".killed.zarr.new-*")
        assert (half / "image_records" / "c" / "0").exists()
    run(killed)
    assert not list(tmp_path.glob(".killed.zarr.new-*"))   # the rerun removed it
    run(full)
    assert len(FeatureStore.open(full)) == 5
    assert helpers.tree_bytes(killed) == helpers.tree_bytes(full)

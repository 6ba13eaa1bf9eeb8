"""A store follows its folder: three rounds of labelling (add images, change a mask, change an
image) touch only what changed, end equal to a store extracted from scratch, and survive a kill
at any point of a round."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpmseg.core.errors import BadInputError
from ddpmseg.featcache import FeatureStore, content
from ddpmseg.pipelines.extract import extract
from ddpmseg.featcache.store import array_name


def chunk_files(store_path) -> dict:
    """{(array, image index): bytes} of every chunk file of a local store but the writer
    records (each attempt that writes stamps the complete images with its token)."""
    out = {}
    for p in sorted(store_path.rglob("*")):
        rel = p.relative_to(store_path).parts
        if p.is_file() and len(rel) > 2 and rel[1] == "c" and rel[0] != "writer":
            out[(rel[0], int(rel[2]))] = p.read_bytes()
    return out


def by_name(store: FeatureStore) -> dict:
    """{name: (maps, labels)} of the active images, for comparing stores order aside."""
    active = content.active_mask(store)
    return {n: (store.maps(i), store.labels(i))
            for i, n in enumerate(store.names) if active[i]}


def assert_same_content(a: FeatureStore, b: FeatureStore) -> None:
    ca, cb = by_name(a), by_name(b)
    assert sorted(ca) == sorted(cb)
    for name in ca:
        for x, y in zip(ca[name][0], cb[name][0]):
            np.testing.assert_array_equal(x, y, err_msg=name)
        np.testing.assert_array_equal(ca[name][1], cb[name][1], err_msg=name)
    assert content.image_set(a) == content.image_set(b)


def write_sample(folder, name, image, mask, helpers):
    helpers.make_folder(folder, [image], [mask], [name])


@pytest.fixture
def grown(tmp_path, faces, faces_config, faces64, helpers, one_thread):
    """Round 0: three faces. Returns (folder, store path, extract(folder) -> store)."""
    folder = helpers.make_folder(tmp_path / "data", [f[1] for f in faces[:3]],
                                 [f[2] for f in faces[:3]], [f[0] for f in faces[:3]])
    path = tmp_path / "grown.zarr"

    def run(**kw):
        # Format 2: these tests compare one chunk file per image (test_fc_shards.py grows a
        # format-3 store); a store keeps its layout, so only the first run makes it so.
        return extract(folder, path, faces_config, backbone=faces64, progress=False,
                       images_per_shard=0, **kw)

    run()
    return folder, path, run


@pytest.mark.slow
def test_three_rounds_touch_only_what_changed_and_equal_scratch(
        grown, tmp_path, faces, faces_config, faces64, helpers):
    folder, path, run = grown
    names0 = [f[0] for f in faces[:3]]

    # Round 1: two new labelled images are appended; no existing chunk changes.
    before = chunk_files(path)
    for name, image, mask in faces[3:5]:
        write_sample(folder, name, image, mask, helpers)
    store = run()
    assert store.names == tuple(names0 + [f[0] for f in faces[3:5]])
    assert store.complete().all()
    after = chunk_files(path)
    assert {k: after[k] for k in before} == before
    assert {i for (_, i) in set(after) - set(before)} == {3, 4}

    # Round 2: a corrected mask of image 0: only its labels chunk is rewritten.
    before = after
    mask = faces[0][2].copy()
    mask[:32] = 1
    np.save(folder / f"{names0[0]}.npy", mask)
    store = run()
    after = chunk_files(path)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("labels", 0)}
    np.testing.assert_array_equal(store.labels(0)[:32], 1)

    # Round 3: image 1's pixels change under the same name: its maps are re-extracted (its
    # stale features are never kept), every other chunk stays.
    before = after
    write_sample(folder, names0[1], faces[1][1][::-1].copy(), faces[1][2], helpers)
    store = run()
    after = chunk_files(path)
    changed = {k for k in before if before[k] != after[k]}
    assert {i for (_, i) in changed} == {1}
    assert {a for (a, _) in changed} >= {array_name(t, b) for t, b in store.info.keys}
    assert store.complete().all()

    # The grown store equals one extracted from scratch on the final folder.
    scratch = extract(folder, tmp_path / "scratch.zarr", faces_config, backbone=faces64,
                      progress=False)
    assert_same_content(store, scratch)


def test_gone_images_refused_pruned_then_compacted(grown, tmp_path, faces, helpers):
    folder, path, run = grown
    gone = faces[1][0]
    for suffix in (".png", ".npy"):
        (folder / f"{gone}{suffix}").unlink()
    before = helpers.tree_bytes(path)
    with pytest.raises(BadInputError, match=gone):
        run()
    assert helpers.tree_bytes(path) == before  # refused before writing anything

    store = run(prune=True)
    assert store.names == tuple(f[0] for f in faces[:3])  # kept on disk...
    assert content.active_mask(store).tolist() == [True, False, True]  # ...inactive
    assert gone not in content.image_set(store)

    store = run(compact=True)
    assert store.names == (faces[0][0], faces[2][0])
    assert content.read_state(store).inactive == ()
    assert not (tmp_path / "grown.zarr.compact").exists()
    assert not (tmp_path / "grown.zarr.old").exists()

    # The image comes back: appended again, active.
    write_sample(folder, gone, faces[1][1], faces[1][2], helpers)
    store = run()
    assert store.names == (faces[0][0], faces[2][0], gone)


@pytest.mark.slow
def test_kill_between_the_steps_of_a_round_resumes_to_the_same_store(
        grown, tmp_path, faces, faces_config, faces64, helpers, monkeypatch):
    """A round interrupted after flags, labels and array sizes were written but before the
    attributes were: rerunning it ends in the store an uninterrupted round makes."""
    folder, path, run = grown
    reference = tmp_path / "reference.zarr"
    shutil.copytree(path, reference)
    for name, image, mask in faces[3:5]:
        write_sample(folder, name, image, mask, helpers)
    mask = faces[0][2].copy()
    mask[:10] = 2
    np.save(folder / f"{faces[0][0]}.npy", mask)
    write_sample(folder, faces[2][0], faces[2][1][:, ::-1].copy(), faces[2][2], helpers)

    real = content.write_state

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(content, "write_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(content, "write_state", real)
    assert FeatureStore.open(path).names == tuple(f[0] for f in faces[:3])  # attrs not yet
    store = run()
    uninterrupted = extract(folder, reference, faces_config, backbone=faces64, progress=False)
    assert helpers.tree_bytes(path) == helpers.tree_bytes(reference)
    assert_same_content(store, uninterrupted)


def _resume_script() -> str:
    """The slowed-down extraction script of test_fc_resume (one definition of it)."""
    path = Path(__file__).with_name("test_fc_resume.py")
    spec = importlib.util.spec_from_file_location("_fc_resume_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCRIPT


@pytest.mark.slow
def test_sigkill_mid_round_resumes_to_the_same_result(tmp_path, faces, faces64_ckpt, helpers):
    folder = helpers.make_folder(tmp_path / "data", [f[1] for f in faces[:2]],
                                 [f[2] for f in faces[:2]], [f[0] for f in faces[:2]])
    script = tmp_path / "grow.py"
    script.write_text(_resume_script())
    killed, full = tmp_path / "killed.zarr", tmp_path / "full.zarr"

    def run(path, delay):
        # Format 3 in shards of 2 images: the round re-extracts image 0 into its shard,
        # fills shard 1 and makes shard 2; a kill lands between two of them.
        return subprocess.Popen([sys.executable, str(script), str(folder), str(path),
                                 str(faces64_ckpt), str(delay), "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    for path in (killed, full):
        proc = run(path, 0)
        assert proc.wait(300) == 0, proc.communicate()[1].decode()
    # The round: four new images and a changed image.
    for name, image, mask in faces[2:6]:
        write_sample(folder, name, image, mask, helpers)
    write_sample(folder, faces[0][0], faces[0][1][::-1].copy(), faces[0][2], helpers)

    def killable() -> bool:
        try:
            store = FeatureStore.open(killed)
            return len(store) == 6 and store.complete().sum() >= 3
        except Exception:  # noqa: BLE001 - attributes being replaced
            return False

    helpers.sigkill_when(run(killed, 0.6), killable)
    assert not FeatureStore.open(killed).complete().all(), "the kill came too late"

    for path in (killed, full):
        proc = run(path, 0)
        assert proc.wait(300) == 0, proc.communicate()[1].decode()
    assert helpers.tree_bytes(killed) == helpers.tree_bytes(full)

"""extract(): real images and the face backbone bundled in the package, masks checked before anything is written."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmseg import data
from ddpmseg.backbone import Backbone
from ddpmseg.backbone.base import image_tensor
from ddpmseg.core.errors import (
    BadInputError,
    ConfigError,
    FeatureOverflowError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract

FACES64_STEPS = (10, 400)      # as tests/featcache/conftest.py's faces_config
FACES64_BLOCKS = (2, 5, 8, 11)


@pytest.mark.slow
def test_extract_writes_the_model_features_and_labels(tmp_path, faces_dir, faces, faces64,
                                                      faces_config, faces64_ckpt):
    store = extract(faces_dir, tmp_path / "s.zarr", faces_config, progress=False)
    info = store.info
    assert len(store) == 4 and store.names == tuple(f[0] for f in faces[:4])
    assert info.steps == FACES64_STEPS and info.blocks == FACES64_BLOCKS
    assert info.image_size == (64, 64) and info.num_classes == 34 and info.has_labels
    assert info.fingerprint == faces64.fingerprint()
    assert info.shapes == tuple(faces64.block_shapes(FACES64_BLOCKS)[b]
                                for _ in FACES64_STEPS for b in FACES64_BLOCKS)
    assert store.complete().all()
    assert store.config["model"]["checkpoint"] == str(faces64_ckpt)
    assert store.config["features"]["steps"] == list(FACES64_STEPS)
    for i, (name, image, mask) in list(enumerate(faces[:4]))[::3]:  # images 0 and 3
        x0 = image_tensor(data.load_image(faces_dir / f"{name}.png"))[None]
        acts = faces64.activations(x0, FACES64_STEPS, FACES64_BLOCKS)
        for got, key in zip(store.maps(i), info.keys):
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, acts[key][0].half().numpy())
        want = data.drop_rare_classes(mask, 34, 255, 20)
        np.testing.assert_array_equal(store.labels(i), want)
    assert (store.labels(0) == 255).sum() >= (faces[0][2] == 255).sum()


@pytest.mark.slow
def test_rerun_is_a_no_op_and_overwrite_replaces(tmp_path, faces_dir, faces64, faces_config,
                                                 helpers):
    path = tmp_path / "s.zarr"
    extract(faces_dir, path, faces_config, backbone=faces64, progress=False)
    before = helpers.tree_bytes(path)
    mtimes = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    extract(faces_dir, path, faces_config, backbone=faces64, progress=False)
    assert helpers.tree_bytes(path) == before
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == mtimes
    other = faces_config.replace(features={"steps": (10,)})
    store = extract(faces_dir, path, other, backbone=faces64, progress=False, overwrite=True)
    assert store.info.steps == (10,) and store.complete().all()
    assert not (path / "act_t400_b2").exists()


@pytest.mark.slow
def test_other_steps_or_checkpoint_are_refused(tmp_path, faces_dir, faces64, faces_config):
    path = tmp_path / "s.zarr"
    extract(faces_dir, path, faces_config, backbone=faces64, progress=False)
    before = sorted(p for p in path.rglob("*"))
    with pytest.raises(StoreMismatchError) as err:
        extract(faces_dir, path, faces_config.replace(features={"steps": (10, 300)}),
                backbone=faces64, progress=False)
    msg = str(err.value)
    assert "steps (10,300 here, 10,400 in the store)" in msg and "`overwrite=True`" in msg
    cfg = faces_config.replace(model={"preset": "tiny64_cosine"},
                                      features={"blocks": (2, 5, 8)})
    with pytest.raises(StoreMismatchError) as err:
        extract(faces_dir, path, cfg, backbone=Backbone.random("tiny64_cosine"), progress=False)
    msg = str(err.value)
    assert "checkpoint sha256" in msg and "noise_schedule" in msg and "blocks" in msg
    with pytest.raises(StoreMismatchError, match=r"seed \(1 here, 0 in the store\)"):
        extract(faces_dir, path, faces_config.replace(features={"seed": 1}),
                backbone=faces64, progress=False)
    with pytest.raises(StoreMismatchError, match="dtype"):
        extract(faces_dir, path, faces_config.replace(features={"dtype": "float32"}),
                backbone=faces64, progress=False)
    # A random backbone of the same flags is another model too.
    with pytest.raises(StoreMismatchError, match="checkpoint sha256"):
        extract(faces_dir, path, faces_config, backbone=Backbone.random("faces_64"),
                progress=False)
    assert sorted(p for p in path.rglob("*")) == before


def test_bad_label_is_an_error_naming_the_mask_and_nothing_is_written(tmp_path, faces,
                                                                      faces_config, helpers):
    masks = [f[2].copy() for f in faces[:3]]
    masks[2][5, 5] = 40  # >= 34 classes and not the ignore label
    folder = helpers.make_folder(tmp_path / "d", [f[1] for f in faces[:3]], masks)
    with pytest.raises(BadInputError) as err:
        extract(folder, tmp_path / "s.zarr", faces_config, progress=False)
    assert "img002.npy" in str(err.value) and "[40]" in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_wrong_size_mask_is_an_error_naming_it(tmp_path, faces, faces_config, helpers):
    masks = [f[2] for f in faces[:3]]
    masks[1] = masks[1][:60]
    folder = helpers.make_folder(tmp_path / "d", [f[1] for f in faces[:3]], masks)
    with pytest.raises(BadInputError, match=r"img001\.npy is 64x60 but its image is 64x64"):
        extract(folder, tmp_path / "s.zarr", faces_config, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_image_size_must_match_unless_resize(tmp_path, faces, faces_config, faces64, helpers):
    big = [np.asarray(Image.fromarray(f[1]).resize((96, 80))) for f in faces[:2]]
    masks = [np.asarray(Image.fromarray(f[2]).resize((96, 80), Image.NEAREST)) for f in faces[:2]]
    folder = helpers.make_folder(tmp_path / "d", big, masks)
    with pytest.raises(BadInputError, match=r"img000\.png is 96x80 but the model takes 64x64.*`resize=True`"):
        extract(folder, tmp_path / "s.zarr", faces_config, backbone=faces64, progress=False)
    assert not (tmp_path / "s.zarr").exists()
    store = extract(folder, tmp_path / "s.zarr", faces_config, backbone=faces64, resize=True,
                    progress=False)
    assert store.info.image_size == (64, 64)
    want = np.asarray(Image.fromarray(masks[1]).resize((64, 64), Image.NEAREST))
    np.testing.assert_array_equal(store.labels(1), data.drop_rare_classes(want, 34, 255, 20))
    x0 = image_tensor(data.load_image(folder / "img001.png", (64, 64), resize=True))[None]
    acts = faces64.activations(x0, FACES64_STEPS, FACES64_BLOCKS)
    np.testing.assert_array_equal(store.maps(1)[0], acts[store.info.keys[0]][0].half().numpy())


def test_images_without_masks_make_a_prediction_only_store(tmp_path, faces, faces_config,
                                                           faces64, helpers):
    folder = helpers.make_folder(tmp_path / "d", [f[1] for f in faces[:2]], [None, None])
    store = extract(folder, tmp_path / "s.zarr", faces_config, backbone=faces64, progress=False)
    assert not store.info.has_labels and store.complete().all()
    with pytest.raises(StoreError, match="no labels"):
        store.labels(0)


def test_some_masks_missing_is_an_error_naming_the_image(tmp_path, faces, faces_config, faces64,
                                                         helpers):
    folder = helpers.make_folder(tmp_path / "d", [f[1] for f in faces[:3]],
                                 [faces[0][2], None, faces[2][2]])
    with pytest.raises(BadInputError, match=r"img001\.png has no mask"):
        extract(folder, tmp_path / "s.zarr", faces_config, backbone=faces64, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_float16_overflow_is_an_error_suggesting_bfloat16(tmp_path, synthetic_dir, fake_config,
                                                          fake_backbone):
    huge = fake_backbone(scale=1e5)
    with pytest.raises(FeatureOverflowError) as err:
        extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=huge, progress=False)
    assert "`dtype=bfloat16`" in str(err.value) and "float16" in str(err.value)
    assert not FeatureStore.open(tmp_path / "s.zarr").complete().any()
    store = extract(synthetic_dir, tmp_path / "b.zarr",
                    fake_config.replace(features={"dtype": "bfloat16"}), backbone=huge,
                    progress=False)
    assert store.complete().all() and np.isfinite(store.maps(0)[0]).all()
    assert np.abs(store.maps(0)[0]).max() > 65504


def test_batches_and_progress(tmp_path, synthetic_dir, fake_config, fake_backbone, capsys,
                              monkeypatch):
    extract(synthetic_dir, tmp_path / "log.zarr", fake_config, backbone=fake_backbone(),
            progress=True)
    assert "img/s" not in capsys.readouterr().err  # stderr is no terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bb = fake_backbone()
    store = extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=bb, images_per_batch=3,
                    progress=True)
    assert bb.calls == 2 and store.complete().all()
    err = capsys.readouterr().err
    assert "4/4" in err and "img/s" in err
    one = extract(synthetic_dir, tmp_path / "one.zarr", fake_config, backbone=fake_backbone(),
                  images_per_batch=1, progress=False)
    for i in range(4):
        for a, b in zip(store.maps(i), one.maps(i)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("per_shard", [0, 3], ids=["format2", "format3"])
def test_resume_redoes_incomplete_and_damaged_images(tmp_path, synthetic_dir, fake_config,
                                                     fake_backbone, helpers, per_shard):
    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False,
            images_per_shard=per_shard)
    want = helpers.tree_bytes(path)
    store = FeatureStore.open(path, mode="r+")
    store.mark_incomplete(1)                       # as if killed while writing image 1
    # A damaged complete image: its chunk file (format 3: image 3's shard, it alone) is gone.
    helpers.image_chunk(path, "act_t50_b2", 3)[0].unlink()
    leftover = path / "labels" / "c" / "0" / "0" / ("0." + "0123456789abcdef" * 2 + ".partial")
    leftover.write_bytes(b"x")  # a killed writer's temporary file
    bb = fake_backbone()
    extract(synthetic_dir, path, fake_config, backbone=bb, progress=False)
    assert bb.calls == 2  # images 1 and 3 only
    assert helpers.tree_bytes(path) == want


def test_resume_after_a_kill_during_store_creation(tmp_path, synthetic_dir, fake_config,
                                                  fake_backbone, helpers):
    import shutil

    path = tmp_path / "s.zarr"
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    want = helpers.tree_bytes(path)
    for name in ("complete", "labels", "act_t50_b2"):  # as if killed before creating these
        shutil.rmtree(path / name)
    extract(synthetic_dir, path, fake_config, backbone=fake_backbone(), progress=False)
    assert helpers.tree_bytes(path) == want


def test_store_path_that_is_not_a_store_is_left_alone(tmp_path, synthetic_dir, fake_config,
                                                      fake_backbone):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a ddpmseg feature store"):
            extract(synthetic_dir, folder, fake_config, backbone=fake_backbone(),
                    overwrite=overwrite, progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(extract(synthetic_dir, empty, fake_config, backbone=fake_backbone(),
                       progress=False)) == 4


def test_settings_are_checked(tmp_path, synthetic_dir, fake_config, fake_backbone):
    bb = fake_backbone()
    for features, match in (({"dtype": "int8"}, "dtype"), ({"steps": ()}, "no steps"),
                            ({"blocks": (1, 1)}, "repeat"), ({"steps": (1000,)}, "out of range"),
                            ({"precision": "fp64"}, "precision")):
        with pytest.raises(ConfigError, match=match):
            extract(synthetic_dir, tmp_path / "s.zarr",
                    fake_config.replace(features=features), backbone=bb, progress=False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        extract(synthetic_dir, tmp_path / "s.zarr",
                fake_config.replace(model={"preset": "tiny64_cosine"}), progress=False,
                resize=True)
    assert not (tmp_path / "s.zarr").exists()


def test_config_attribute_is_json(tmp_path, synthetic_dir, fake_config, fake_backbone):
    extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
            precision="bf16", images_per_batch=2, progress=False)
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["config"]["features"]["precision"] == "bf16"
    assert attrs["config"]["features"]["images_per_batch"] == 2
    assert attrs["ddpmseg"]["precision"] == "bf16"
    assert torch.tensor(attrs["ddpmseg"]["image_size"]).tolist() == [32, 32]


def test_binary_masks_are_accepted(tmp_path, synthetic_dir, fake_config, fake_backbone):
    folder = tmp_path / "binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for k in range(2):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"b{k}.png")
    circle = np.hypot(*np.mgrid[-16:16, -16:16]) < 10
    np.save(folder / "b0.npy", circle)                               # bool .npy
    Image.fromarray(~circle).convert("1").save(folder / "b1_mask.png")  # 1-bit PNG
    store = extract(folder, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                    progress=False)
    np.testing.assert_array_equal(store.labels(0), circle.astype(np.uint8))
    np.testing.assert_array_equal(store.labels(1), (~circle).astype(np.uint8))


def test_extract_computes_with_its_threads_and_leaves_the_callers(tmp_path, synthetic_dir,
                                                                  fake_config, fake_backbone):
    """``threads=`` is torch's thread count for the run only (it used to be set globally by
    the CLI): the caller's count is the same afterwards, also when the run fails."""
    seen = []

    class Counting(fake_backbone):
        def activations(self, *args, **kw):
            seen.append(torch.get_num_threads())
            return super().activations(*args, **kw)

    before = torch.get_num_threads()
    extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=Counting(), threads=3,
            progress=False)
    assert set(seen) == {3} and torch.get_num_threads() == before
    with pytest.raises(FeatureOverflowError):
        extract(synthetic_dir, tmp_path / "t.zarr", fake_config,
                backbone=Counting(scale=1e6), threads=2, progress=False)
    assert seen[-1] == 2 and torch.get_num_threads() == before

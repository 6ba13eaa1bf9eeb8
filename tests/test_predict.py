"""Tiled prediction: exactness against untiled and dense prediction, outputs, input checks, and
prediction from an image folder against prediction from a store of the same images."""

import dataclasses
import importlib
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ddpmseg.outputs import render
from ddpmseg.backbone import Backbone, factory
from ddpmseg.spec import BackboneId
from ddpmseg.backbone.bundled import DEMO_DATA, resolve_checkpoint
from ddpmseg.classifier import Ensemble
from ddpmseg.config import Config, ModelConfig
from ddpmseg.backbone.base import image_tensor
from ddpmseg.core.errors import (
    BadInputError,
    ConfigError,
    FeatureOverflowError,
    StoreMismatchError,
)
from ddpmseg.pipelines.extract import extract
from ddpmseg.featcache import pixels
from ddpmseg.featcache.pixels import TileFeatures
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo, parse_codec, round_mantissa
from ddpmseg.pipelines.predict import check_compatible, predict, predict_maps
from ddpmseg.outputs.voting import vote as vote_fn

# `ddpmseg.predict` may be re-exported as a function by the package; the module is this.
predict_module = importlib.import_module("ddpmseg.pipelines.predict")


pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BLOCKS = (5, 50), (3, 7)
SHAPES = ((6, 5, 6), (4, 10, 12), (6, 5, 6), (4, 10, 12))  # (C, h, w) per (step, block)
SIZE = (20, 24)  # (H, W): non-square, and 20 is divisible by neither 3 nor 7
OVERLAY_SCALE = 13  # overlays are enlarged to at least 256 px: ceil(256 / 20)
NUM_CLASSES = 5


SPEC_FIELDS = {f.name for f in dataclasses.fields(FeatureSpec)}


def make_info(n=2, **kw) -> StoreInfo:
    """A StoreInfo of n images; keyword arguments change the spec's or the info's fields."""
    spec = dict(steps=STEPS, blocks=BLOCKS, shapes=SHAPES, image_size=SIZE, dtype="float32",
                backbone=BackboneId("abc", {"image_size": 24}))
    info = dict(num_images=n, names=tuple(f"img{i}" for i in range(n)),
                num_classes=NUM_CLASSES, ignore_label=255,
                class_names=("bg", "a", "b", "c", "d"), has_labels=False)
    for key, value in kw.items():
        (spec if key in SPEC_FIELDS else info)[key] = value
    return StoreInfo(FeatureSpec(**spec), **info)


def make_maps(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def make_store(path, n=2, **kw):
    info = make_info(n, **kw)
    store = FeatureStore.create(path, info)
    for i in range(n):
        store.write_image(i, make_maps(100 + i, info.shapes))
    return FeatureStore.open(path)


def make_members(k=3, dim=20, seed=0):
    torch.manual_seed(seed)
    members = []
    for _ in range(k):
        m = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, NUM_CLASSES))
        m[2].running_mean.normal_()
        m[2].running_var.uniform_(0.5, 2.0)
        members.append(m.eval())
    return members


@pytest.fixture
def run_model():
    return Ensemble(make_members(), make_info(), Config())


def dense_reference(members, maps, size, method):
    """The reference's way: every map upsampled to the full image, concatenated, all pixels."""
    ups = [F.interpolate(m[None].float(), size=size, mode="bilinear", align_corners=False)[0]
           for m in maps]
    feats = torch.cat(ups).reshape(sum(m.shape[0] for m in maps), -1).T
    with torch.no_grad():
        logits = torch.stack([m(feats) for m in members])
    return vote_fn(logits, method).reshape(size).numpy().astype(np.uint8)


def test_tile_features_are_the_reference_features():
    # Upsampled maps, a map at the image's own size and one larger than the image.
    shapes = SHAPES + ((3, 20, 24), (2, 40, 30))
    maps = [m.half() for m in make_maps(3, shapes)]
    tiles = TileFeatures(maps, SIZE)
    full = torch.cat([F.interpolate(m[None].float(), size=SIZE, mode="bilinear",
                                    align_corners=False)[0] for m in maps])
    for y0, y1 in ((0, 20), (0, 3), (3, 10), (19, 20)):
        got = tiles.rows(y0, y1).T
        ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(SIZE[1]), indexing="ij")
        torch.testing.assert_close(got, pixels.pixel_features(maps, SIZE, ys.ravel(), xs.ravel()),
                                   rtol=1e-5, atol=1e-5)
        want = full[:, y0:y1].reshape(full.shape[0], -1).T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["soft", "log", "hard"])
def test_tiled_equals_untiled_and_dense(method):
    members = make_members()
    maps = make_maps(7)
    full = predict_maps(members, maps, SIZE, vote=method, tile_rows=SIZE[0], uncertainty=True)
    for rows in (1, 3, 7, 19, 64):
        tiled = predict_maps(members, maps, SIZE, vote=method, tile_rows=rows, uncertainty=True)
        assert np.array_equal(tiled.labels, full.labels), rows
        np.testing.assert_allclose(tiled.entropy, full.entropy, rtol=0, atol=1e-6)
        np.testing.assert_allclose(tiled.jsd, full.jsd, rtol=0, atol=1e-6)
    assert full.labels.dtype == np.uint8 and full.labels.shape == SIZE
    assert len(np.unique(full.labels)) > 1  # a meaningful comparison
    assert np.array_equal(full.labels, dense_reference(members, maps, SIZE, method))


def test_predict_store_outputs(tmp_path, run_model):
    store = make_store(tmp_path / "s.zarr")
    images = tmp_path / "orig"
    images.mkdir()
    Image.fromarray(np.full((*SIZE, 3), 200, np.uint8)).save(images / "img0.png")
    # An open store is accepted as well as its path.
    res = predict(run_model, store, tmp_path / "out", uncertainty=True,
                  tile_rows=7, device="cpu", images=images, progress=False)
    out = tmp_path / "out"
    assert res["names"] == ["img0", "img1"] and res["input_kind"] == "store"
    for i, name in enumerate(store.names):
        labels = np.load(out / f"{name}.npy")
        assert labels.dtype == np.uint8 and labels.shape == SIZE
        expect = predict_maps(run_model.members, store.maps(i), SIZE, tile_rows=SIZE[0])
        assert np.array_equal(labels, expect.labels)
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P"
            assert np.array_equal(np.asarray(im), labels)
        with Image.open(out / f"{name}_overlay.png") as im:
            assert im.mode == "RGB" and im.size == (SIZE[1] * OVERLAY_SCALE + render.LEGEND_WIDTH,
                                                    SIZE[0] * OVERLAY_SCALE)
        ent = np.load(out / f"{name}_entropy.npy")
        jsd = np.load(out / f"{name}_jsd.npy")
        assert ent.shape == SIZE and jsd.shape == SIZE and ent.dtype == np.float32
        assert np.all(ent >= 0) and np.all(ent <= np.log(NUM_CLASSES) + 1e-5)
        assert np.all(jsd >= 0) and np.all(jsd <= ent + 1e-5)
        assert (out / f"{name}_uncertainty.png").is_file()
    palette = json.loads((out / "palette.json").read_text())
    assert palette["classes"][1]["name"] == "a"
    settings = json.loads((out / "predict.json").read_text())
    assert settings["vote"] == "soft" and settings["tile_rows"] == 7
    assert settings["num_members"] == 3 and settings["images"] == str(images)
    with Image.open(out / "summary.png") as im:
        assert im.mode == "RGB"
    # img0's overlay is drawn on its original (light grey 200), img1's on mid grey 128.
    with Image.open(out / "img0_overlay.png") as a, Image.open(out / "img1_overlay.png") as b:
        assert np.asarray(a)[-1].mean() > np.asarray(b)[-1].mean()


def test_vote_and_tile_rows_default_to_run_config(tmp_path):
    cfg = Config().replace(predict={"vote": "hard", "tile_rows": 3})
    model = Ensemble(make_members(), make_info(), cfg)
    make_store(tmp_path / "s.zarr")
    res = predict(model, tmp_path / "s.zarr", tmp_path / "out", device="cpu", progress=False)
    assert res["vote"] == "hard" and res["tile_rows"] == 3
    with pytest.raises(ConfigError):
        predict(model, tmp_path / "s.zarr", tmp_path / "out", vote="mean", progress=False)


@pytest.mark.parametrize("change, words", [
    ({"backbone": BackboneId("other", {"image_size": 24})}, "sha256"),
    ({"backbone": BackboneId("abc", {"image_size": 32})}, "image_size"),
    ({"steps": (5, 60)}, "steps"),
    ({"blocks": (3, 8)}, "blocks"),
    ({"shapes": ((6, 5, 6), (4, 10, 12), (6, 5, 6), (5, 10, 12))}, "shapes"),
])
def test_store_mismatch_says_what_differs(tmp_path, run_model, change, words):
    make_store(tmp_path / "s.zarr", **change)
    with pytest.raises(StoreMismatchError, match=words):
        predict(run_model, tmp_path / "s.zarr", tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_check_compatible_accepts_equal_and_notes_a_tolerated_difference(caplog):
    """Equal features (another image set) pass without a word; another seed passes with one
    note naming it; other steps are refused."""
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        assert check_compatible(make_info().spec,
                                make_info(n=5, names=tuple("abcde")).spec, "s.zarr") is None
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        check_compatible(make_info().spec, make_info(seed=7).spec, "s.zarr")
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "s.zarr" in notes[0] and "seed" in notes[0]
    with pytest.raises(StoreMismatchError, match="steps"):
        check_compatible(make_info().spec, make_info(steps=(5, 60)).spec, "s.zarr")


def test_image_folder_wrong_size_names_the_file(tmp_path, run_model):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(folder / "small.png")
    with pytest.raises(BadInputError, match=r"small\.png.*`resize=True`"):
        predict(run_model, folder, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


class FakeBackbone:
    """Deterministic 'activations': pooled, channel-mixed images at each map's shape."""

    sha256 = "abc"
    scale = 1.0

    def activations(self, x0, steps, blocks, seed=0, precision="fp32"):
        out = {}
        for k, ((t, b), (c, h, w)) in enumerate(zip([(t, b) for t in steps for b in blocks],
                                                    SHAPES)):
            pooled = F.adaptive_avg_pool2d(x0, (h, w))
            mix = torch.Generator().manual_seed(k)
            weight = torch.randn(c, 3, generator=mix)
            out[(t, b)] = (torch.einsum("ck,bkhw->bchw", weight, pooled) + t / 100) * self.scale
        return out


def test_image_folder_path_with_a_substitute_backbone(tmp_path, monkeypatch):
    """The image-folder path (resize, tiling, outputs) without the real backbone."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    cfg = Config(model=ModelConfig(checkpoint=str(ckpt)))
    model = Ensemble(make_members(), make_info(), cfg)
    monkeypatch.setattr(factory, "load_backbone", lambda *a: FakeBackbone())
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*SIZE, 3)).astype(np.uint8)).save(folder / "p.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)).save(folder / "q.jpg")
    res = predict(model, folder, tmp_path / "out", resize=True, tile_rows=6, device="cpu",
                  progress=False, at_model_size=True)
    assert res["input_kind"] == "images" and res["names"] == ["p", "q"]
    assert np.load(tmp_path / "out" / "q.npy").shape == SIZE
    with Image.open(tmp_path / "out" / "q_overlay.png") as im:
        assert im.size == (SIZE[1] * OVERLAY_SCALE + render.LEGEND_WIDTH, SIZE[0] * OVERLAY_SCALE)
    # A checkpoint other than the run's is refused.
    monkeypatch.setattr(FakeBackbone, "sha256", "zzz")
    with pytest.raises(StoreMismatchError, match="sha256"):
        predict(model, folder, tmp_path / "out2", resize=True, device="cpu", progress=False)


def test_store_with_other_rounding_predicts_with_one_line_naming_both(tmp_path, caplog):
    """A run trained on a bitround3 store, predicting from a lossless store: close features,
    not equal ones, so it goes ahead and says so on stderr in one line."""
    model = Ensemble(make_members(), make_info(codec=parse_codec("bitround3", "float32")),
                     Config())
    make_store(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        res = predict(model, tmp_path / "s.zarr", tmp_path / "out", device="cpu",
                      progress=False)
    notes = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and "rounding (" in r.getMessage()]
    assert notes == [f"note: {tmp_path / 's.zarr'} has other features than the run was "
                     "trained on: rounding (bitround3 in the run, lossless in the store)"]
    assert res["names"] == ["img0", "img1"]
    caplog.clear()
    same = Ensemble(make_members(), make_info(), Config())
    predict(same, tmp_path / "s.zarr", tmp_path / "out2", device="cpu", progress=False)
    assert not [r for r in caplog.records if "rounding (" in r.getMessage()]


def test_image_folder_rounds_features_as_the_runs_store(tmp_path, monkeypatch):
    """Features extracted on the fly for a run trained on a bitround3 store are rounded to 3
    mantissa bits, exactly as `extract --codec bitround3` stores them."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr(factory, "load_backbone", lambda *a: FakeBackbone())
    seen = []
    real = predict_module.predict_maps
    monkeypatch.setattr(predict_module, "predict_maps",
                        lambda members, maps, *a, **k: seen.append(maps) or real(members, maps,
                                                                                   *a, **k))
    folder = tmp_path / "imgs"
    folder.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3)).astype(np.uint8)
    Image.fromarray(image).save(folder / "p.png")
    raw = FakeBackbone().activations(image_tensor(image)[None], STEPS, BLOCKS)
    raw = [raw[key][0].float() for key in [(t, b) for t in STEPS for b in BLOCKS]]
    for codec in ("bitround3", "lossless"):
        info = make_info(codec=parse_codec(codec, "float32"))
        model = Ensemble(make_members(), info, Config(model=ModelConfig(checkpoint=str(ckpt))))
        predict(model, folder, tmp_path / codec, device="cpu", progress=False)
        want = [round_mantissa(m, 3) if codec != "lossless" else m for m in raw]
        assert all(np.array_equal(g, w.numpy()) for g, w in zip(seen[-1], want))
    assert not all(np.array_equal(a, b) for a, b in zip(*seen))  # the rounding is not a no-op


def test_suggest_on_an_image_folder_leaves_out_images_with_masks(tmp_path, monkeypatch):
    from ddpmseg.pipelines.suggest import suggest

    model = _substitute_model(tmp_path, monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("p", "q", "r"):
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3)).astype(np.uint8)).save(
            folder / f"{name}.png")
    np.save(folder / "q.npy", np.zeros(SIZE, np.uint8))   # q is labelled
    np.save(folder / "r.npy", np.full(SIZE, 255, np.uint8))  # only the ignore label: not
    ranked = suggest(model, folder, tmp_path / "s", device="cpu")
    assert ranked.skipped == {"q": "with a mask"}
    assert sorted(s.name for s in ranked) == ["p", "r"]
    assert len(suggest(model, folder, tmp_path / "s", device="cpu", include_labelled=True)) == 3


def test_image_folder_float16_overflow_raises_as_extract_does(tmp_path, monkeypatch):
    """Features made on the fly pass the store's encoding: a float16 overflow is an error
    naming the image, never silent inf features."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    model = Ensemble(make_members(), make_info(dtype="float16"),
                     Config(model=ModelConfig(checkpoint=str(ckpt))))
    big = FakeBackbone()
    big.scale = 1e6  # activations far beyond float16's 65504
    monkeypatch.setattr(factory, "load_backbone", lambda *a: big)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((*SIZE, 3), 90, np.uint8)).save(folder / "p.png")
    with pytest.raises(FeatureOverflowError, match=r"image p activation t=5 block=3.*float16"):
        predict(model, folder, tmp_path / "out", device="cpu", progress=False)
    big.scale = 1.0  # the same run and images within range predict
    res = predict(model, folder, tmp_path / "out", device="cpu", progress=False)
    assert res["names"] == ["p"]


@pytest.mark.slow
def test_image_folder_equals_store_with_real_backbone(tmp_path):
    """Features extracted on the fly give the same predictions as a store of the same images
    made by `extract` (the bundled face backbone and demo images)."""
    ckpt = resolve_checkpoint("bundled:faces_64")
    bb = Backbone.from_checkpoint(ckpt, "faces_64", "cpu")
    steps, blocks = (50, 150), (2, 5)
    size = (64, 64)
    names = ["img00000599", "img00000829"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in names:
        (folder / f"{name}.png").write_bytes((DEMO_DATA / "test" / f"{name}.png").read_bytes())
    store_path = tmp_path / "s.zarr"
    cfg = Config().replace(
        data={"num_classes": NUM_CLASSES},
        features={"steps": steps, "blocks": blocks, "dtype": "float16"})
    info = extract(folder, store_path, cfg, backbone=bb, device="cpu", progress=False).info
    members = make_members(dim=info.feature_dim, seed=1)
    # Batch-norm statistics from these features, so that the members' predictions vary.
    sample = FeatureStore.open(store_path).dense_rows(0, 0, size[0])
    with torch.no_grad():
        for m in members:
            m[2].momentum = None
            m[2].reset_running_stats()
            m.train()(sample)
            m.eval()
    model = Ensemble(members, info, Config(model=ModelConfig(checkpoint=str(ckpt))))
    from_store = predict(model, store_path, tmp_path / "o1", device="cpu", tile_rows=16,
                         uncertainty=True, progress=False)
    from_images = predict(model, folder, tmp_path / "o2", device="cpu", tile_rows=16,
                          uncertainty=True, progress=False)
    assert from_store["names"] == from_images["names"] == names
    for name in names:
        a = np.load(tmp_path / "o1" / f"{name}.npy")
        b = np.load(tmp_path / "o2" / f"{name}.npy")
        assert np.array_equal(a, b)
        assert np.array_equal(np.load(tmp_path / "o1" / f"{name}_entropy.npy"),
                              np.load(tmp_path / "o2" / f"{name}_entropy.npy"))
    assert len(np.unique(np.load(tmp_path / "o1" / f"{names[0]}.npy"))) > 1


def _substitute_model(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    monkeypatch.setattr(factory, "load_backbone", lambda *a: FakeBackbone())
    return Ensemble(make_members(), make_info(), Config(model=ModelConfig(checkpoint=str(ckpt))))


def test_image_folder_reads_a_sideways_photo_upright(tmp_path, monkeypatch):
    """A photo stored sideways with EXIF Orientation=6 is predicted as it is shown: the same
    masks as the upright pixels, at the displayed size (the model's 24x20 here)."""
    model = _substitute_model(tmp_path, monkeypatch)
    upright = np.random.default_rng(0).integers(0, 256, (*SIZE, 3)).astype(np.uint8)
    for folder in ("phone", "plain"):
        (tmp_path / folder).mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 20 wide, 24 high in the file
    Image.fromarray(stored).save(tmp_path / "phone" / "p.png", exif=exif.tobytes())
    Image.fromarray(upright).save(tmp_path / "plain" / "p.png")
    for folder in ("phone", "plain"):
        predict(model, tmp_path / folder, tmp_path / f"out-{folder}", device="cpu",
                progress=False)
    got = np.load(tmp_path / "out-phone" / "p.npy")
    assert got.shape == SIZE
    np.testing.assert_array_equal(got, np.load(tmp_path / "out-plain" / "p.npy"))


def test_resize_notes_each_stretch_once_width_x_height(tmp_path, monkeypatch, caplog):
    model = _substitute_model(tmp_path, monkeypatch)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "imgs" / "q.png")
    predict(model, tmp_path / "imgs", tmp_path / "out", resize=True, device="cpu",
            progress=False)
    notes = [r.getMessage() for r in caplog.records if "stretches" in r.getMessage()]
    assert len(notes) == 1 and "q.png is 30x40; `resize=stretch` stretches it to 24x20" in notes[0]


def test_a_store_image_whose_labels_are_all_ignore_counts_as_unlabelled(tmp_path):
    info = make_info(2, has_labels=True)
    store = FeatureStore.create(tmp_path / "s.zarr", info)
    store.write_image(0, make_maps(100), np.zeros(SIZE, np.uint8))
    store.write_image(1, make_maps(101), np.full(SIZE, 255, np.uint8))
    source = predict_module.open_source(tmp_path / "s.zarr", Ensemble(make_members(), info,
                                                                      Config()),
                                        torch.device("cpu"), None, False)
    assert {n: has for n, (_, has) in source.image_content().items()} == {"img0": True,
                                                                          "img1": False}


def test_image_folder_with_another_architectures_checkpoint_names_the_sha256(tmp_path):
    """predict --checkpoint with a file of another architecture than the run's backbone: the
    run records the sha256 of its checkpoint, so the answer is "not the run's checkpoint",
    in one line, not the state-dict keys that do not fit."""
    import hashlib

    from ddpmseg.backbone import ModelFlags

    faces = resolve_checkpoint("bundled:faces_64")
    want = hashlib.sha256(faces.read_bytes()).hexdigest()
    flags = ModelFlags.resolve("faces_64").to_dict()
    model = Ensemble(make_members(), make_info(backbone=BackboneId(want, flags)),
                     Config(model=ModelConfig(checkpoint=str(faces))))
    other = tmp_path / "other.pt"
    torch.save({"time_embed.0.weight": torch.zeros(4, 4), "out.2.weight": torch.zeros(3)},
               other)
    got = hashlib.sha256(other.read_bytes()).hexdigest()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(folder / "p.png")
    with pytest.raises(StoreMismatchError) as info:
        predict(model, folder, tmp_path / "out", checkpoint=str(other), device="cpu",
                progress=False)
    assert str(info.value) == (
        f"checkpoint {other} is not the run's checkpoint (sha256 {got[:12]}, expected "
        f"{want[:12]}); give `checkpoint=PATH`, the checkpoint the run's store was extracted "
        f"with")
    assert not (tmp_path / "out").exists()


def test_predict_runs_on_the_threads_asked_for_and_restores_the_count(tmp_path, run_model,
                                                                     monkeypatch):
    seen = []
    real = predict_module.predict_maps
    monkeypatch.setattr(predict_module, "predict_maps",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    make_store(tmp_path / "s.zarr")
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    predict(run_model, tmp_path / "s.zarr", tmp_path / "out", device="cpu", progress=False,
            threads=want)
    assert seen == [want, want] and torch.get_num_threads() == before


def test_max_image_pixels_reaches_the_images_predict_reads(tmp_path, monkeypatch):
    model = _substitute_model(tmp_path, monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(folder / "p.png")
    pixels_ = SIZE[0] * SIZE[1]
    with pytest.raises(BadInputError, match=f"above the limit of {pixels_ - 1}"):
        predict(model, folder, tmp_path / "out", device="cpu", progress=False,
                max_image_pixels=pixels_ - 1)
    assert not (tmp_path / "out").exists()
    res = predict(model, folder, tmp_path / "out", device="cpu", progress=False,
                  max_image_pixels=pixels_)
    assert res["names"] == ["p"]

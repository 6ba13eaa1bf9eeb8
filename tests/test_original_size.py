"""Predictions at each photo's own size: a 360x240 photo gives 360x240 masks, pictures and
uncertainty; ``at_model_size`` gives the old output byte for byte; ``evaluate`` scores such a
folder against 360x240 masks without ``resize``; the three ways of fitting a non-square
image (stretch, pad, tiles) and how their scores go back to the image's size."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpmseg import data
from ddpmseg.backbone.base import image_tensor
from ddpmseg.featcache.store import decode_map
from ddpmseg.outputs import render, voting
from ddpmseg.outputs.evaluate import evaluate
from ddpmseg.pipelines.extract import encoded_maps
from ddpmseg.pipelines.predict import at_original_size, predict, predict_maps
from tests.test_predict import SIZE, FakeBackbone, _substitute_model, predict_module

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTO = (240, 360)  # (H, W): 360x240, neither square nor a multiple of the model's 24x20


@pytest.fixture
def photo_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    # Smooth content, so that the (pooled) fake features vary over the picture.
    small = rng.integers(0, 256, (6, 9, 3)).astype(np.uint8)
    Image.fromarray(small).resize((PHOTO[1], PHOTO[0]), Image.BILINEAR).save(folder / "p.png")
    return folder


@pytest.mark.parametrize("mode", ["stretch", "pad", "tiles"])
def test_a_360x240_photo_gives_360x240_outputs_by_default(tmp_path, monkeypatch, photo_dir,
                                                          mode):
    model = _substitute_model(tmp_path, monkeypatch)
    out = tmp_path / "out"
    res = predict(model, photo_dir, out, resize=mode, uncertainty=True, device="cpu",
                  progress=False)
    labels = np.load(out / "p.npy")
    assert labels.shape == PHOTO
    for kind in ("entropy", "jsd"):
        assert np.load(out / f"p_{kind}.npy").shape == PHOTO
    with Image.open(out / "p.png") as im:
        assert im.size == (PHOTO[1], PHOTO[0])
    with Image.open(out / "p_overlay.png") as im:  # enlarged x2 to 256+ px, legend beside
        assert im.size == (2 * PHOTO[1] + render.LEGEND_WIDTH, 2 * PHOTO[0])
    meta = json.loads((out / "predict.json").read_text())
    assert meta["resize"] == mode and meta["at_model_size"] is False
    assert res["image_size"] == list(SIZE)


def _old_prediction(model, path):
    """predict's output before predictions came at the image's size: the stretched image."""
    image = data.load_image(path, SIZE, resize=True)
    (encoded,) = encoded_maps(FakeBackbone(), image_tensor(image)[None], model.info.spec, ["p"])
    maps = [decode_map(m, model.info.spec.dtype) for m in encoded]
    return image, predict_maps(model.members, maps, SIZE, vote="soft", tile_rows=32)


def test_at_model_size_gives_the_old_bytes(tmp_path, monkeypatch, photo_dir):
    model = _substitute_model(tmp_path, monkeypatch)
    out = tmp_path / "out"
    predict(model, photo_dir, out, resize=True, at_model_size=True, device="cpu",
            progress=False)
    image, old = _old_prediction(model, photo_dir / "p.png")
    got = np.load(out / "p.npy")
    assert got.shape == SIZE and got.tobytes() == old.labels.tobytes()
    want_png = tmp_path / "want.png"
    render.save_label_png(want_png, old.labels, render.make_palette(5, 255))
    assert (out / "p.png").read_bytes() == want_png.read_bytes()
    names = render.class_names(model.info.class_names, model.config.data.class_names)
    over = render.overlay(image, old.labels, render.make_palette(5, 255), names, 5,
                          min_side=predict_module.OVERLAY_MIN_SIDE)
    Image.fromarray(over).save(tmp_path / "want_overlay.png")
    assert (out / "p_overlay.png").read_bytes() == (tmp_path / "want_overlay.png").read_bytes()


def test_an_image_at_the_model_size_is_predicted_alike_either_way(tmp_path, monkeypatch):
    model = _substitute_model(tmp_path, monkeypatch)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (*SIZE, 3)).astype(np.uint8)).save(
        tmp_path / "imgs" / "p.png")
    for flag in (False, True):
        predict(model, tmp_path / "imgs", tmp_path / f"out{flag}", at_model_size=flag,
                uncertainty=True, device="cpu", progress=False)
    for name in ("p.npy", "p.png", "p_overlay.png", "p_entropy.npy", "p_jsd.npy"):
        assert (tmp_path / "outFalse" / name).read_bytes() == \
            (tmp_path / "outTrue" / name).read_bytes(), name


def test_evaluate_at_the_photos_size_needs_no_resize(tmp_path, monkeypatch, photo_dir):
    model = _substitute_model(tmp_path, monkeypatch)
    out = tmp_path / "out"
    predict(model, photo_dir, out, resize="pad", device="cpu", progress=False)
    labels = np.load(out / "p.npy")
    gt = tmp_path / "gt"
    gt.mkdir()
    mask = labels.copy()
    mask[:40] = 255  # unlabelled rows
    np.save(gt / "p.npy", mask)
    res = evaluate(out, gt, write=False)
    want = np.mean([1.0 if (labels == c).any() else 0.0 for c in range(5)])
    # The rows of ignore-label ground truth count in the predicted classes' unions.
    assert res["per_image"]["p"] < 1.0 and res["miou"] <= want
    np.save(gt / "p.npy", labels)
    assert evaluate(out, gt, write=False)["per_image"]["p"] == 1.0


def test_tiles_have_no_picture_at_the_model_size(tmp_path, monkeypatch, photo_dir):
    model = _substitute_model(tmp_path, monkeypatch)
    with pytest.raises(Exception, match="resize=stretch"):
        predict(model, photo_dir, tmp_path / "out", resize="tiles", at_model_size=True,
                device="cpu", progress=False)


# -- the scores' way back to the image's size ----------------------------------------------
def assert_argmax(labels, scores):
    """``labels`` is the argmax of (C, H, W) ``scores`` up to float32 rounding: a pixel may
    differ only where two classes' scores tie within it (the separable resize rounds
    differently from F.interpolate)."""
    chosen = np.take_along_axis(scores.numpy(), labels[None].astype(np.int64), 0)[0]
    assert (chosen >= scores.max(0).values.numpy() - 1e-5).all()
    assert (labels == scores.argmax(0).numpy()).mean() > 0.999


def _scores(channels, hw, seed=0):
    return torch.rand((channels, *hw), generator=torch.Generator().manual_seed(seed))


def test_stretch_resizes_the_scores_bilinearly_then_argmax():
    lay = data.layout(PHOTO, (20, 24), "stretch")
    scores = _scores(5, (20, 24))
    got = at_original_size([scores], lay, tile_rows=7)
    want = F.interpolate(scores[None], size=PHOTO, mode="bilinear", align_corners=False)[0]
    assert_argmax(got.labels, want)


def test_pad_crops_the_letterbox_then_resizes():
    lay = data.layout(PHOTO, (24, 24), "pad")
    assert lay.inner == (4, 0, 16, 24)  # 240x360 scaled by 24/360 -> 16 rows, centred
    scores = _scores(7, (24, 24), seed=1)  # 5 classes + entropy + JSD
    got = at_original_size([scores], lay, uncertainty=True)
    want = F.interpolate(scores[None, :, 4:20], size=PHOTO, mode="bilinear",
                         align_corners=False)[0]
    assert_argmax(got.labels, want[:5])
    np.testing.assert_allclose(got.entropy, want[5].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.jsd, want[6].numpy(), rtol=1e-5, atol=1e-6)


def test_tiles_average_the_overlaps():
    lay = data.layout((20, 40), (20, 24), "tiles")
    assert lay.windows() == [(0, 0), (0, 16)]  # stride 18, the last flush with the edge
    a, b = _scores(3, (20, 24), 2), _scores(3, (20, 24), 3)
    got = at_original_size([a, b], lay)
    full = torch.zeros(3, 20, 40)
    full[:, :, :16], full[:, :, 24:] = a[:, :, :16], b[:, :, 8:]
    full[:, :, 16:24] = (a[:, :, 16:] + b[:, :, :8]) / 2
    np.testing.assert_array_equal(got.labels, full.argmax(0).numpy())


@pytest.mark.parametrize("method", ["soft", "log", "hard"])
def test_scores_argmax_is_the_vote(method):
    logits = torch.randn(3, 500, 4, generator=torch.Generator().manual_seed(0))
    logits[:, :50] = logits[:1, :50]  # members that agree: hard-vote ties are rare otherwise
    np.testing.assert_array_equal(voting.scores(logits, method).argmax(-1).numpy(),
                                  voting.vote(logits, method).numpy())


# -- fitting images and masks ----------------------------------------------------------------
def test_pad_letterboxes_image_and_mask_and_the_border_is_ignored():
    lay = data.layout((32, 48), (24, 24), "pad")
    image = np.full((32, 48, 3), 200, np.uint8)
    mask = np.ones((32, 48), np.uint8)
    (fitted,), (labels,) = data.fit_image(image, lay), data.fit_mask(mask, lay, 255)
    assert fitted.shape == (24, 24, 3) and labels.shape == (24, 24)
    assert (labels[:4] == 255).all() and (labels[20:] == 255).all()
    assert (labels[4:20] == 1).all() and (fitted[4:20] == 200).all()
    assert (fitted[:4] == data.PAD_VALUE).all()


def test_tiles_cut_image_and_mask_alike_and_pad_short_sides():
    lay = data.layout((16, 40), (20, 24), "tiles")
    assert lay.padded == (20, 40) and lay.windows() == [(0, 0), (0, 16)]
    mask = np.arange(16 * 40).reshape(16, 40).astype(np.uint8)
    image = np.repeat(mask[..., None], 3, axis=2)
    tiles, labels = data.fit_image(image, lay), data.fit_mask(mask, lay, 255)
    assert [t.shape for t in tiles] == [(20, 24, 3)] * 2
    np.testing.assert_array_equal(labels[1][:16], mask[:, 16:40])
    assert (labels[1][16:] == 255).all()
    np.testing.assert_array_equal(tiles[1][:16, :, 0], mask[:, 16:40])


def test_resize_modes_and_their_names():
    assert data.resize_mode(True) == data.DEFAULT_RESIZE and data.resize_mode(False) is None
    assert data.layout((20, 24), (20, 24), "tiles").mode == "same"
    with pytest.raises(Exception, match="stretch, pad, tiles"):
        data.resize_mode("crop")


def test_resize_option_bare_or_with_a_way():
    import click
    from click.testing import CliRunner

    from ddpmseg.cli.common import resize_option

    @click.command()
    @click.argument("paths", nargs=-1)
    @resize_option("images")
    def show(paths, resize):
        click.echo(f"{list(paths)} {resize!r}")

    def run(*argv):
        return CliRunner().invoke(show, list(argv))

    assert run("a", "b").output.strip() == "['a', 'b'] False"
    assert run("a", "b", "--resize").output.strip() == "['a', 'b'] True"  # the old spelling
    assert run("a", "--resize", "tiles", "b").output.strip() == "['a', 'b'] 'tiles'"
    assert run("--resize=pad", "a").output.strip() == "['a'] 'pad'"
    wrong = run("--resize", "a", "b")
    assert wrong.exit_code == 2 and "put paths before it" in wrong.output


def test_more_classes_than_a_label_map_holds_is_refused_at_the_image_size_too():
    """An ensemble of 300 classes: at the image's size as at the model's, a RunError, never
    a uint8 argmax that wraps 256 to 0."""
    from ddpmseg.core.errors import RunError
    from ddpmseg.pipelines.predict import predict_item

    torch.manual_seed(0)
    members = [torch.nn.Linear(3, 300)]
    maps = [torch.randn(3, 8, 8)]
    lay = data.layout((12, 20), (8, 8), "stretch")
    for layout in (None, lay):
        with pytest.raises(RunError, match="300 classes"):
            predict_item(members, [maps], (8, 8), layout)

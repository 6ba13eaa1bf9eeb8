"""A store records each image's own size and how it was fitted to the model (stretch, pad,
tiles), so that predictions from it come out at that size; padding is labelled ignore; a
store made one way is not extended another way; an old store predicts at the model's size."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ddpmseg.classifier import Ensemble
from ddpmseg.core.errors import BadInputError
from ddpmseg.featcache import content
from ddpmseg.pipelines.extract import extract
from ddpmseg.pipelines.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wide_dir(tmp_path):
    """Two 48x32 images (3:2) with 3-class masks."""
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
            folder / f"w{k}.png")
        mask = np.zeros((32, 48), np.uint8)
        mask[:, 16:] = 1
        mask[20:, 30:] = 2
        np.save(folder / f"w{k}.npy", mask)
    return folder


def _model(store, config):
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(store.info.feature_dim, 3)).eval() for _ in range(2)]
    return Ensemble(members, store.info, config)


def test_pad_labels_the_border_ignore_and_records_the_size(tmp_path, wide_dir, fake_backbone,
                                                           fake_config):
    store = extract(wide_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                    resize="pad", progress=False)
    labels = store.labels(0)  # 48x32 scaled to 32x21, centred: rows 5..25 hold the image
    assert labels.shape == (32, 32)
    assert (labels[:5] == 255).all() and (labels[26:] == 255).all()
    assert set(np.unique(labels[5:26])) == {0, 1, 2}
    assert content.read_state(store).sizes == {"w0": [32, 48, "pad"], "w1": [32, 48, "pad"]}
    out = tmp_path / "pred"
    predict(_model(store, fake_config), store, out, uncertainty=True, device="cpu",
            progress=False)
    assert np.load(out / "w0.npy").shape == (32, 48)
    assert np.load(out / "w0_entropy.npy").shape == (32, 48)
    predict(_model(store, fake_config), store, tmp_path / "small", at_model_size=True,
            device="cpu", progress=False)
    assert np.load(tmp_path / "small" / "w0.npy").shape == (32, 32)


def test_another_way_on_rerun_is_refused(tmp_path, wide_dir, fake_backbone, fake_config):
    extract(wide_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
            resize="pad", progress=False)
    with pytest.raises(BadInputError, match="resize=pad"):
        extract(wide_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                resize="stretch", progress=False)


def test_tiles_are_store_images_with_their_mask_windows(tmp_path, wide_dir, fake_backbone,
                                                        fake_config):
    store = extract(wide_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                    resize="tiles", progress=False)
    assert store.names == ("w0@0_0", "w0@0_16", "w1@0_0", "w1@0_16")
    mask = np.load(wide_dir / "w0.npy")
    np.testing.assert_array_equal(store.labels(1), mask[:, 16:48])
    with Image.open(wide_dir / "w0.png") as im:
        window = np.asarray(im)[:, 16:48]
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(window).save(plain / "w0@0_16.png")
    one = extract(plain, tmp_path / "one.zarr", fake_config, backbone=fake_backbone(),
                  progress=False)
    for a, b in zip(store.maps(1), one.maps(0)):
        np.testing.assert_array_equal(a, b)


def test_a_store_without_sizes_predicts_at_the_model_size_with_a_note(
        tmp_path, wide_dir, fake_backbone, fake_config, caplog):
    store = extract(wide_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                    resize="stretch", progress=False)
    state = content.read_state(store)
    writable = type(store).open(store.path, mode="r+")
    content.write_state(writable, store.info, content.ImageState(state.hashes))  # as before
    with caplog.at_level(logging.WARNING, logger="ddpmseg"):
        predict(_model(store, fake_config), store.path, tmp_path / "out", device="cpu",
                progress=False)
    assert np.load(tmp_path / "out" / "w0.npy").shape == (32, 32)
    notes = [r.getMessage() for r in caplog.records if "original image sizes" in r.getMessage()]
    assert len(notes) == 1

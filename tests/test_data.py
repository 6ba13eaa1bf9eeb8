import numpy as np
import pytest
from PIL import Image

from ddpmseg import data
from ddpmseg.errors import BadInputError, InputNotFoundError


def _image(path, size=(8, 8), mode="RGB"):
    Image.new(mode, size, color=1 if mode in ("L", "P") else (10, 20, 30)[: len(mode)]).save(path)


def test_samples_pair_images_with_masks(tmp_path):
    _image(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint8))
    _image(tmp_path / "b.jpg")
    _image(tmp_path / "b.png", mode="L")  # PNG mask of a JPEG image
    _image(tmp_path / "c.png")
    samples = data.list_samples(tmp_path)
    assert [(s.name, s.mask and s.mask.name) for s in samples] == [
        ("a", "a.npy"), ("b", "b.png"), ("c", None)]
    with pytest.raises(BadInputError, match="c.png has no mask"):
        data.list_samples(tmp_path, require_masks=True)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(InputNotFoundError):
        data.list_samples(tmp_path / "nope")
    with pytest.raises(InputNotFoundError, match="no images"):
        data.list_samples(tmp_path)


def test_image_size_and_modes(tmp_path):
    _image(tmp_path / "g.png", size=(6, 4), mode="L")
    img = data.load_image(tmp_path / "g.png")
    assert img.shape == (4, 6, 3) and img.dtype == np.uint8
    with pytest.raises(BadInputError, match="g.png is 4x6"):
        data.load_image(tmp_path / "g.png", size=(8, 8))
    assert data.load_image(tmp_path / "g.png", size=(8, 8), resize=True).shape == (8, 8, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(BadInputError, match="bad.png"):
        data.load_image(tmp_path / "bad.png")


def test_image_tensor_range():
    t = data.image_tensor(np.array([[[0, 255, 127]]], np.uint8))
    assert t.shape == (3, 1, 1)
    assert t.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])


def test_masks(tmp_path):
    np.save(tmp_path / "m.npy", np.arange(16).reshape(4, 4).astype(np.int32))
    assert data.load_mask(tmp_path / "m.npy", (4, 4)).dtype == np.uint8
    with pytest.raises(BadInputError, match="m.npy is 4x4"):
        data.load_mask(tmp_path / "m.npy", (8, 8))
    big = data.load_mask(tmp_path / "m.npy", (8, 8), resize=True)
    assert big[0, 0] == 0 and big[7, 7] == 15
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(BadInputError, match="RGB"):
        data.load_mask(tmp_path / "rgb.png", (4, 4))
    with pytest.raises(BadInputError, match=r"labels \[15\]"):
        data.check_labels(data.load_mask(tmp_path / "m.npy", (4, 4)), 15, 255, tmp_path / "m.npy")


def test_rare_classes_become_ignore():
    mask = np.zeros((10, 10), np.uint8)
    mask[0, :5] = 1            # 5 pixels: dropped
    mask[1:4, :] = 2           # 30 pixels: kept
    out = data.drop_rare_classes(mask, 3, 255, min_pixels=20)
    assert (out[0, :5] == 255).all() and (out[1:4] == 2).all() and (out[5:] == 0).all()
    # The ignore label itself is never relabelled, even when it is a class index (bedroom_28).
    mask[9, 9] = 0
    assert data.drop_rare_classes(mask, 3, 0, min_pixels=20)[0, 0] == 0

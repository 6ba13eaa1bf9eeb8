import numpy as np
import pytest
from PIL import Image

from ddpmseg import data
from ddpmseg.backbone.base import image_tensor
from ddpmseg.core.errors import BadInputError, InputNotFoundError


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
    with pytest.raises(BadInputError, match="g.png is 6x4"):
        data.load_image(tmp_path / "g.png", size=(8, 8))
    assert data.load_image(tmp_path / "g.png", size=(8, 8), resize=True).shape == (8, 8, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(BadInputError, match="bad.png"):
        data.load_image(tmp_path / "bad.png")


def test_image_tensor_range():
    t = image_tensor(np.array([[[0, 255, 127]]], np.uint8))
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


# -- images as people have them (issue 22) -------------------------------------------------------

ORIENTATION = 0x0112  # the EXIF tag


def _sideways(path, stored, orientation=6, **kw):
    """Save ``stored`` with an EXIF Orientation tag: a viewer shows it turned (6: 90 degrees
    clockwise), as phone cameras write portrait photos."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **kw)


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)     # 6 wide, 4 high as stored
    _sideways(tmp_path / "p.png", stored)
    upright = np.rot90(stored, k=-1)                               # 4 wide, 6 high as shown
    np.testing.assert_array_equal(data.load_image(tmp_path / "p.png"), upright)
    assert data.image_hw(tmp_path / "p.png") == (6, 4)
    # A phone JPEG: the displayed size, and the pixels of the displayed picture.
    _sideways(tmp_path / "phone.jpg", np.repeat(stored, 8, axis=0).repeat(8, axis=1), quality=95)
    assert data.load_image(tmp_path / "phone.jpg").shape == (48, 32, 3)
    # A PNG mask with the tag is turned as its image is.
    labels = rng.integers(0, 5, (4, 6), dtype=np.uint8)
    _sideways(tmp_path / "p_mask.png", labels)
    np.testing.assert_array_equal(data.read_mask(tmp_path / "p_mask.png"), np.rot90(labels, -1))
    # Orientation 1 (or none) changes nothing.
    _sideways(tmp_path / "q.png", stored, orientation=1)
    np.testing.assert_array_equal(data.load_image(tmp_path / "q.png"), stored)


def test_max_image_pixels_means_n(tmp_path):
    import warnings

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "big_mask.png")
    pil_default = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for read in (data.load_image, data.read_mask, data.image_hw, data.is_mask_png):
            mask = read in (data.read_mask, data.is_mask_png)
            path = tmp_path / ("big_mask.png" if mask else "big.png")
            # 2000 pixels: above N, below PIL's own 2N
            with pytest.raises(BadInputError, match=r"big(_mask)?\.png is 50x40 = 2000 pixels, "
                                                    r"above the limit of 1999 .*max_image_pixels"):
                read(path, max_image_pixels=1999)
    assert not seen  # one error, no Python warning besides it
    # exactly N is allowed
    assert data.load_image(tmp_path / "big.png", max_image_pixels=2000).shape == (40, 50, 3)
    # above 2N: PIL's own error, the same one line
    with pytest.raises(BadInputError, match=r"big\.png .*limit of 500 .*max_image_pixels=500"):
        data.load_image(tmp_path / "big.png", max_image_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == pil_default  # a parameter: nothing set globally


def test_max_image_pixels_above_pils_own_limit_lets_big_images_through(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL refuses above 1000 itself
    with pytest.raises(BadInputError, match="limit of 500"):
        data.load_image(tmp_path / "big.png")  # None: PIL's limit
    assert data.load_image(tmp_path / "big.png", max_image_pixels=2000).shape == (40, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 500  # lifted for that one open only
    # list_samples reads headers too (mask-like files): the limit reaches them
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "big_mask.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "big_cls.png")
    assert [s.name for s in data.list_samples(tmp_path, max_image_pixels=2000)] == ["big"]
    with pytest.raises(BadInputError, match="big_cls.png is 50x40"):
        data.list_samples(tmp_path, max_image_pixels=1999)


def test_resize_mask_is_nearest_neighbour():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    big = data.resize_mask(mask, (4, 6))
    assert big.shape == (4, 6) and big.dtype == np.uint8
    assert set(np.unique(big).tolist()) == {0, 1, 2, 255}  # never a blend of two labels
    np.testing.assert_array_equal(data.resize_mask(big, (2, 2)), mask)


def test_unreadable_files_are_one_error_naming_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad_mask.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match=r"cannot read image .*bad\.png") as err:
        data.load_image(tmp_path / "bad.png")
    assert err.value.hint == "replace or remove the file"
    with pytest.raises(BadInputError, match=r"cannot read image .*bad_mask\.png"):
        data.read_mask(tmp_path / "bad_mask.png")
    (tmp_path / "bad.npy").write_bytes(b"not npy")
    with pytest.raises(BadInputError, match=r"cannot read mask .*bad\.npy"):
        data.read_mask(tmp_path / "bad.npy")


def test_check_labels_of_a_prediction_names_it_and_never_blames_compression(tmp_path):
    pred = np.zeros((64, 64), np.uint8)
    pred[10, 10] = 7
    with pytest.raises(BadInputError, match=r"^prediction .*p\.npy has labels \[7\]") as err:
        data.check_labels(pred, 3, 255, tmp_path / "p.npy", what="prediction")
    assert "lossy" not in err.value.hint and "`num_classes=N`" in err.value.hint


def test_sizes_are_written_width_x_height(tmp_path, caplog):
    _image(tmp_path / "wide.png", size=(6, 4))     # PIL sizes are (width, height)
    with pytest.raises(BadInputError, match=r"wide\.png is 6x4 but the model takes 8x8"):
        data.check_image_size(tmp_path / "wide.png", (4, 6), (8, 8), resize=False)
    np.save(tmp_path / "m.npy", np.zeros((4, 6), np.uint8))
    with pytest.raises(BadInputError, match=r"m\.npy is 6x4 but its image is 10x8"):
        data.load_mask(tmp_path / "m.npy", (8, 10))
    data.check_image_size(tmp_path / "wide.png", (4, 6), (8, 8), resize=True)
    assert "wide.png is 6x4; `resize=stretch` stretches it to 8x8" in caplog.text


def _names(samples):
    return [(s.name, s.mask and s.mask.name) for s in samples]


def test_masks_under_other_names_are_named_not_read_as_images(tmp_path, caplog):
    for stem in ("a", "b", "c"):
        _image(tmp_path / f"{stem}.png")
    _image(tmp_path / "a_label.png", mode="L")       # another tool's mask name
    _image(tmp_path / "b_gt.png", mode="P")
    _image(tmp_path / "c_cls.png", mode="L")         # grey, named after a colour image
    np.save(tmp_path / "c.npy", np.zeros((8, 8), np.uint8))
    assert _names(data.list_samples(tmp_path)) == [("a", None), ("b", None), ("c", "c.npy")]
    notes = [r.getMessage() for r in caplog.records if "accepted" in r.getMessage()]
    assert len(notes) == 1
    for name in ("a_label.png", "b_gt.png", "c_cls.png", data.ACCEPTED_MASKS):
        assert name in notes[0]
    assert "<id>_mask.png" in data.ACCEPTED_MASKS and "<id>.npy" in data.ACCEPTED_MASKS


def test_grey_images_with_similar_names_stay_images(tmp_path, caplog):
    _image(tmp_path / "g.png", mode="L")
    _image(tmp_path / "g_2.png", mode="L")
    assert _names(data.list_samples(tmp_path)) == [("g", None), ("g_2", None)]
    assert "accepted" not in caplog.text


@pytest.mark.parametrize("name", ["a_mask.jpg", "a_mask.jpeg", "a_mask.webp", "a_label.jpg"])
def test_lossy_masks_are_refused(tmp_path, name):
    _image(tmp_path / "a.png")
    _image(tmp_path / name, mode="L")
    with pytest.raises(BadInputError, match=rf"{name}.*lossy.*label values") as err:
        data.list_samples(tmp_path)
    assert "<id>_mask.png" in err.value.hint


def test_stray_masks_get_a_note(tmp_path, caplog):
    _image(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.uint8))
    np.save(tmp_path / "gone.npy", np.zeros((8, 8), np.uint8))
    _image(tmp_path / "lost_mask.png", mode="L")
    assert _names(data.list_samples(tmp_path)) == [("a", "a.npy")]
    notes = [r.getMessage() for r in caplog.records if "no image" in r.getMessage()]
    assert len(notes) == 1 and "gone.npy" in notes[0] and "lost_mask.png" in notes[0]
    assert "a.npy" not in notes[0]


def _jpeg_damaged(mask):
    """``mask`` once saved as a JPEG and read back: values change along the class edges."""
    import io

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def test_out_of_range_labels_say_how_many_pixels_and_name_lossy_masks(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[13:47, 19:45] = 10    # edges off JPEG's 8-pixel blocks: ringing there
    mask[30:, 30:] = 3
    damaged = _jpeg_damaged(mask)
    bad = int(((damaged > 10) & (damaged != 255)).sum())
    assert 0 < bad < 200
    with pytest.raises(BadInputError) as err:
        data.check_labels(damaged, 11, 255, tmp_path / "m.png")
    assert f"on {bad} of 4096 pixels" in str(err.value)
    assert "lossy" in err.value.hint and "JPEG" in err.value.hint
    # A real class beyond the count: a region, not scattered pixels: the class count is the fix.
    mask[:20, :] = 12
    with pytest.raises(BadInputError) as err:
        data.check_labels(mask, 11, 255, tmp_path / "m.png")
    assert "on 1280 of 4096 pixels" in str(err.value)
    assert "lossy" not in err.value.hint and "`num_classes=N`" in err.value.hint


def test_report_shows_the_picture_upright(tmp_path):
    import importlib

    report = importlib.import_module("ddpmseg.outputs.report")  # the package exports a function too
    stored = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _sideways(tmp_path / "p.png", stored)
    np.testing.assert_array_equal(report._original([tmp_path], "p"), np.rot90(stored, -1))

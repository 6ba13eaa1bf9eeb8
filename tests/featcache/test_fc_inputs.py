"""Extract meets images and masks as people have them: phone photos stored sideways (EXIF
orientation), masks that label no pixel."""

import logging

import numpy as np
from PIL import Image

from ddpmseg import data
from ddpmseg.pipelines.extract import extract


def _save_sideways(path, stored):
    exif = Image.Exif()
    exif[0x0112] = 6   # Orientation: shown turned 90 degrees clockwise
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)


def test_a_sideways_phone_jpeg_meets_its_upright_mask(tmp_path, fake_backbone, fake_config):
    rng = np.random.default_rng(0)
    folder = tmp_path / "phone"
    folder.mkdir()
    stored = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)   # 48 wide, 32 high in the file
    _save_sideways(folder / "p.jpg", stored)
    mask = np.zeros((48, 32), np.uint8)                              # 32 wide, 48 high as shown
    mask[:16] = 1
    mask[30:, :8] = 2
    np.save(folder / "p.npy", mask)
    store = extract(folder, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
                    resize=True, progress=False)
    want = np.asarray(Image.fromarray(mask).resize((32, 32), Image.NEAREST))
    np.testing.assert_array_equal(store.labels(0), want)
    # The maps are those of the upright picture: the decoded file turned clockwise.
    with Image.open(folder / "p.jpg") as im:
        upright = np.ascontiguousarray(np.rot90(np.asarray(im.convert("RGB")), -1))
    (tmp_path / "upright").mkdir()
    Image.fromarray(upright).save(tmp_path / "upright" / "p.png")
    plain = extract(tmp_path / "upright", tmp_path / "u.zarr", fake_config,
                    backbone=fake_backbone(), resize=True, progress=False)
    for a, b in zip(store.maps(0), plain.maps(0)):
        np.testing.assert_array_equal(a, b)


def test_a_mask_of_only_the_ignore_label_gets_a_note(tmp_path, fake_backbone, fake_config,
                                                       synthetic_dir, caplog):
    np.save(synthetic_dir / "img002.npy", np.full((32, 32), 255, np.uint8))
    with caplog.at_level(logging.INFO, logger="ddpmseg"):
        store = extract(synthetic_dir, tmp_path / "s.zarr", fake_config,
                        backbone=fake_backbone(), progress=False)
    notes = [r.getMessage() for r in caplog.records if "ignore label" in r.getMessage()]
    assert len(notes) == 1 and "img002.npy" in notes[0] and "unlabelled" in notes[0]
    assert (store.labels(2) == 255).all() and store.info.has_labels
    assert data.labelled(store.labels(2), 255) is False and data.labelled(store.labels(1), 255)

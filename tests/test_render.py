"""Palette PNGs, overlays with legends, heat maps and the contact sheet."""

import json

import numpy as np
from PIL import Image

from ddpmseg import render


def test_palette_distinct_and_ignore_black():
    pal = render.make_palette(34, 255)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal[:34]}) == 34
    assert tuple(pal[255]) == (0, 0, 0)


def test_label_png_roundtrip(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, size=(37, 50)).astype(np.uint8)
    pal = render.make_palette(21, 255)
    render.save_label_png(tmp_path / "m.png", labels, pal)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), labels)
        assert np.array_equal(np.asarray(im.convert("RGB")), render.colorize(labels, pal))


def test_palette_json(tmp_path):
    pal = render.make_palette(3, 255)
    render.save_palette(tmp_path / "p.json", pal, 3, 255, ("bg", "cat"))
    data = json.loads((tmp_path / "p.json").read_text())
    assert [c["name"] for c in data["classes"]] == ["bg", "cat", "class_2"]
    assert data["classes"][1]["rgb"] == list(pal[1])
    assert len(data["palette"]) == 768


def test_overlay_is_rgb_image_size_with_legend():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 34, size=(64, 48)).astype(np.uint8)  # more classes than lines fit
    pal = render.make_palette(34, 255)
    image = rng.integers(0, 256, size=(64, 48, 3)).astype(np.uint8)
    out = render.overlay(image, labels, pal, ("background", "a very long class name " * 3))
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    plain = render.overlay(image, labels, pal, legend=False)
    assert not np.array_equal(out, plain)          # the legend was drawn
    assert np.array_equal(out[-10:, -10:], plain[-10:, -10:])  # and only at the top-left
    grey = render.overlay(None, labels, pal, legend=False)
    expect = np.rint(128 * 0.5 + pal[labels].astype(np.float32) * 0.5).astype(np.uint8)
    assert np.array_equal(grey, expect)


def test_overlay_resizes_a_differently_sized_image():
    labels = np.zeros((20, 30), np.uint8)
    out = render.overlay(np.zeros((40, 60, 3), np.uint8), labels, render.make_palette(2))
    assert out.shape == (20, 30, 3)


def test_overlay_enlarges_small_masks_by_a_whole_factor():
    labels = np.array([[0, 1], [1, 0]], np.uint8)
    out = render.overlay(None, labels, render.make_palette(2), legend=False, min_side=5)
    assert out.shape == (6, 6, 3)
    small = render.overlay(None, labels, render.make_palette(2), legend=False)
    assert np.array_equal(out[::3, ::3], small)


def test_heatmap_monotone_brightness():
    values = np.linspace(0, 1, 11)[None, :]
    rgb = render.heatmap(values, 1.0).astype(int)
    assert rgb.shape == (1, 11, 3)
    brightness = rgb.sum(-1)[0]
    assert brightness[0] < brightness[5] < brightness[-1]
    assert np.array_equal(render.heatmap(np.full((2, 2), 5.0), 1.0)[0, 0], rgb[0, -1])


def test_uncertainty_and_contact_sheet_and_confusion():
    ent = np.random.default_rng(2).random((16, 20)).astype(np.float32)
    im = render.uncertainty_image(ent, ent / 2, num_classes=5, num_members=3)
    assert im.size == (44, 16)
    pal = render.make_palette(4)
    lab = np.zeros((16, 20), np.uint8)
    rows = [("a", None, render.colorize(lab, pal), render.overlay(None, lab, pal)),
            ("b", np.zeros((16, 20, 3), np.uint8), render.colorize(lab, pal),
             render.overlay(None, lab, pal))]
    sheet = render.contact_sheet(rows)
    assert sheet.mode == "RGB" and sheet.width >= 60 and sheet.height >= 32
    conf = render.confusion_image(np.array([[5, 1], [0, 0]]))
    assert conf.mode == "RGB"

"""Palette PNGs, overlays with legends, heat maps and the contact sheet."""

import json

import numpy as np
import pytest
from PIL import Image

from ddpmseg.outputs import render


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
    data = json.loads(json.dumps(render.palette_json(pal, 3, 255, ("bg", "cat"))))
    assert [c["name"] for c in data["classes"]] == ["bg", "cat", "class_2"]
    assert data["classes"][1]["rgb"] == list(pal[1])
    assert len(data["palette"]) == 768


def _swatch_colours(panel: np.ndarray) -> list[tuple]:
    """Colours of the legend's swatches, top to bottom: the swatch column's non-white runs."""
    col = panel[:, 10]
    colours, previous = [], None
    for rgb in map(tuple, col):
        if rgb != previous and len(set(rgb)) > 1:   # swatches are coloured, text is grey
            colours.append(rgb)
        previous = rgb
    return colours


def test_overlay_legend_is_a_panel_beside_the_picture():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 34, size=(64, 48)).astype(np.uint8)  # more classes than lines fit
    labels[:40] = 7                                                 # class 7 covers the most
    labels[40:50] = 3                                               # then class 3
    pal = render.make_palette(34, 255)
    image = rng.integers(0, 256, size=(64, 48, 3)).astype(np.uint8)
    out = render.overlay(image, labels, pal, ("background", "a very long class name " * 3),
                         min_side=128)                 # 3x: 192 x 144, room for 9 lines
    assert out.shape == (192, 144 + render.LEGEND_WIDTH, 3) and out.dtype == np.uint8
    plain = render.overlay(image, labels, pal, legend=False, min_side=128)
    assert plain.shape == (192, 144, 3)
    assert np.array_equal(out[:, :144], plain)         # nothing drawn on the picture
    panel = out[:, 144:]
    assert tuple(panel[1, -2]) == render.PANEL_RGB     # a white panel
    swatches = _swatch_colours(panel)
    assert swatches[:2] == [tuple(pal[7]), tuple(pal[3])]  # largest first
    assert len(swatches) < 34                          # the rest: "+N more"
    grey = render.overlay(None, labels, pal, legend=False)
    expect = np.rint(128 * 0.5 + pal[labels].astype(np.float32) * 0.5).astype(np.uint8)
    assert np.array_equal(grey, expect)


def test_overlay_resizes_a_differently_sized_image():
    labels = np.zeros((20, 30), np.uint8)
    out = render.overlay(np.zeros((40, 60, 3), np.uint8), labels, render.make_palette(2))
    assert out.shape == (20, 30 + render.LEGEND_WIDTH, 3)


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


def test_uncertainty_maps_are_enlarged_with_colour_bars_and_captions_outside():
    ent = np.random.default_rng(2).random((16, 20)).astype(np.float32)
    jsd = ent / 2
    im = np.asarray(render.uncertainty_image(ent, jsd, num_classes=5, num_members=3))
    factor = 16                                        # 16 rows -> at least 256
    pad, gap = 8, 16
    top = pad + render._line_height(render.font(render.CAPTION_FONT))
    (ent_max, _), (jsd_max, _) = render.uncertainty_limits(5, 3)
    assert ent_max == pytest.approx(np.log(5)) and jsd_max == pytest.approx(np.log(3))
    width = 20 * factor
    for x0, values, vmax in ((pad, ent, ent_max), (pad + width + gap, jsd, jsd_max)):
        expect = render.heatmap(values, vmax).repeat(factor, 0).repeat(factor, 1)
        # The map, whole and untouched: no caption or scale drawn over it.
        assert np.array_equal(im[top:top + 16 * factor, x0:x0 + width], expect)
        caption = im[pad:top, x0:x0 + width]
        assert (caption < 128).any()                   # the caption's text is there
        bar = im[top + 16 * factor + 4 + 6, x0:x0 + width].astype(int)  # the colour bar
        assert np.abs(bar[1] - render.heatmap(np.zeros(1), 1.0)[0]).max() <= 3
        assert np.abs(bar[-2] - render.heatmap(np.ones(1), 1.0)[0]).max() <= 3
        ticks = im[top + 16 * factor + 4 + 14:, x0:x0 + width]
        assert (ticks[:, :20] < 128).any() and (ticks[:, -40:] < 128).any()  # "0" ... "ln 5"


def _boxes_of(sheet: np.ndarray, colour, tol: int = 0) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of the pixels of ``colour`` (within ``tol``)."""
    near = np.abs(sheet.astype(int) - np.asarray(colour, dtype=int)).max(axis=-1) <= tol
    ys, xs = np.nonzero(near)
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_contact_sheet_tiles_are_scaled_alike_with_the_legend_beside_them():
    pal = render.make_palette(4)
    small = np.zeros((16, 20), np.uint8)
    small[:, 10:] = 1
    big = np.full((64, 80), 2, np.uint8)
    photo = np.zeros((256, 320, 3), np.uint8)           # an image larger than its labels
    rows = [("a-rather-long-name-" * 8, photo, small), ("b", None, big)]
    tile = 96
    sheet = np.asarray(render.contact_sheet(rows, pal, ("bg", "one", "two"), 4, tile=tile))
    pad = 8
    body_w = 3 * tile + 4 * pad
    # Row 1's prediction tile: classes 0 | 1, 96 x 77 (20:16 scaled to fit 96), centred.
    y0, y1, x0, x1 = _boxes_of(sheet[:, :body_w], tuple(pal[0]))
    assert x0 == pad + tile + pad and y1 - y0 + 1 == round(16 * tile / 20)
    _, _, _, x1b = _boxes_of(sheet[:, :body_w], tuple(pal[1]))
    assert x1b - x0 + 1 == tile                        # the whole prediction tile is 96 wide
    # Row 2's prediction (64 x 80 labels) has the same size as row 1's (16 x 20).
    y0c, y1c, x0c, x1c = _boxes_of(sheet[:, :body_w], tuple(pal[2]))
    assert (y1c - y0c, x1c - x0c) == (y1 - y0, x1b - x0)
    # The image tile is black and exactly tile-sized: the photo was scaled, not pasted.
    black = np.all(sheet[y0:y1 + 1, pad:pad + tile] == 0, axis=-1)
    assert black.all() and not np.all(sheet[y0:y1 + 1, pad + tile] == 0)
    # Names never reach into the pictures: between the rows' tiles only white and text.
    assert y0c > y1 + pad
    # The legend: to the right of every tile, listing the three classes present.
    legend = sheet[:, body_w:]
    assert set(_swatch_colours(legend)) == {tuple(pal[c]) for c in (0, 1, 2)}


def test_confusion_image_has_names_row_normalised_cells_and_a_scale():
    names = ["0 background", "1 a cat"]
    conf = np.asarray(render.confusion_image(np.array([[5, 1], [0, 0]]), names, names))
    cell_a = tuple(render.heatmap(np.array([5 / 6]), 1.0)[0])
    cell_b = tuple(render.heatmap(np.array([1 / 6]), 1.0)[0])
    y0, y1, x0, x1 = _boxes_of(conf, cell_a)
    by0, by1, bx0, bx1 = _boxes_of(conf, cell_b)
    cell = y1 - y0 + 1
    assert cell == x1 - x0 + 1 and (by0, bx0) == (y0, x1 + 1)   # row 0: 5/6 then 1/6
    assert np.all(conf[y1 + 1:y1 + cell + 1, x0:bx1 + 1] == render.NO_DATA_RGB)  # empty row
    assert (conf[y0:y1 + 1, :x0 - 2] < 100).any()      # a row name left of the grid
    assert (conf[:y0 - 2, x0:x1 + 1] < 100).any()      # a column name above it
    # The colour scale right of the grid runs from 1 (top) to 0 (bottom).
    scale = conf[:, bx1 + 1:]
    top = _boxes_of(scale, tuple(render.heatmap(np.ones(1), 1.0)[0]), tol=10)
    bottom = _boxes_of(scale, tuple(render.heatmap(np.zeros(1), 1.0)[0]), tol=10)
    assert top[0] < bottom[0]
    longer = render.confusion_image(np.array([[5, 1], [0, 0]]), ["0 background a lot"] * 2,
                                    ["0 background a lot"] * 2)
    assert longer.width > conf.shape[1] and longer.height > conf.shape[0]


def test_class_names_fall_back_in_one_place():
    # A run's recorded names win over its config's; none: () and class_<c> per index.
    assert render.class_names(("bg", "cat"), ("x", "y", "z")) == ("bg", "cat")
    assert render.class_names((), ["x", "y"]) == ("x", "y")
    assert render.class_names((), None) == ()
    assert [render.class_name(render.class_names(("bg",)), c) for c in range(2)] == \
        ["bg", "class_1"]


# -- the font: readable class names ---------------------------------------------------------------
LATIN1_NAME = "Straße/Müll/naïve"


@pytest.fixture
def fresh_font():
    """font() is cached per size: clear it around tests that change what it finds."""
    render.font.cache_clear()
    yield render.font
    render.font.cache_clear()


def _panel(label: str) -> np.ndarray:
    return np.asarray(render.legend_panel([(label, (200, 30, 30))], width=300))


def test_latin1_names_are_drawn_with_glyphs_not_boxes():
    fnt = render.font(render.LEGEND_FONT)
    assert render.missing_glyphs(LATIN1_NAME, fnt) == ""
    assert render.missing_glyphs("a漢b字", fnt) == "漢字"       # CJK: DejaVu Sans has none
    # The same name with the font's missing-glyph box in place of ß, ü, ï: other pixels.
    boxed = "".join(render.NOTDEF_PROBE if ch in "ßüï" else ch for ch in LATIN1_NAME)
    assert not np.array_equal(_panel("0 " + LATIN1_NAME), _panel("0 " + boxed))
    for ch in "ßüï":
        assert not np.array_equal(_panel(ch), _panel(render.NOTDEF_PROBE)), ch


def test_font_is_dejavu_when_present_else_pillows_bundled_font(fresh_font, monkeypatch, tmp_path):
    from PIL import ImageFont

    assert fresh_font(12) is fresh_font(12)                      # one font per size
    if render.DEJAVU_SANS.is_file():
        assert fresh_font(12).getname()[0] == "DejaVu Sans"
    monkeypatch.setattr(render, "DEJAVU_SANS", tmp_path / "absent.ttf")
    fresh_font.cache_clear()
    bundled = fresh_font(12)
    assert bundled.getname() == ImageFont.load_default(size=12).getname()
    assert render.missing_glyphs("ß", bundled) == "ß"           # Pillow's own font: ASCII only


def test_layout_line_heights_stay_those_of_pillows_bundled_font():
    from PIL import ImageFont

    for size in (render.LEGEND_FONT, render.CAPTION_FONT):
        assert (render._line_height(render.font(size))
                == render._line_height(ImageFont.load_default(size=size)))


def test_unreadable_class_names_one_note_per_sheet_never_a_crash(caplog):
    labels = np.repeat(np.arange(3, dtype=np.uint8), 12).reshape(6, 6)
    names = ("background", LATIN1_NAME, "漢字")
    pal = render.make_palette(3, 255)
    with caplog.at_level("WARNING", logger="ddpmseg.outputs.render"):
        sheet = render.contact_sheet([("a", None, labels), ("b", None, labels)], pal, names, 3)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "漢字" in notes[0] and "Straße" not in notes[0]
    assert sheet.width > 3 * render.SHEET_TILE
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddpmseg.outputs.render"):
        render.confusion_image(np.eye(3), names, names)
    assert len(caplog.records) == 1


def test_bitmap_font_writes_question_marks_instead_of_crashing(monkeypatch):
    from PIL import ImageFont

    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()  # < 10.1
    monkeypatch.setattr(render, "font", lambda size=12: bitmap)
    assert render.missing_glyphs("Straße 漢字", bitmap) == "漢字"
    assert render._fit_text("1 漢字", bitmap, 200) == "1 ??"
    panel = _panel("1 漢字")                                     # used to raise UnicodeEncodeError
    assert np.array_equal(panel, _panel("1 ??"))

"""Pictures of predictions: class palette, palette PNGs, overlays with a legend panel, heat maps
with colour bars, the contact sheet and the confusion-matrix image.

Pillow only (DejaVu Sans where the system has it, else Pillow's bundled font): these pictures are a few rectangles, ramps and lines of text,
which Pillow draws exactly where asked, so pixel tests can check what lands where; a plotting
library would add a heavy dependency for no visible gain. Legends, captions and colour scales
always sit beside the pictures, never on them.
"""

from __future__ import annotations

import colorsys
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpmseg.data import resize_mask

log = logging.getLogger(__name__)

IGNORE_RGB = (0, 0, 0)
GREY_RGB = (128, 128, 128)
PANEL_RGB = (255, 255, 255)      # background of legends, captions and colour bars
TEXT_RGB = (20, 20, 20)
NO_DATA_RGB = (200, 200, 200)    # confusion rows with no ground-truth pixels
LEGEND_WIDTH = 200               # px of the legend panel beside an overlay
LEGEND_FONT = 12
CAPTION_FONT = 13
# Debian's (and Ubuntu's) DejaVu Sans: Latin-1 and far more. Pillow's bundled FreeType font
# (Aileron) has ASCII only, so names with ß/ü/ï would be drawn as boxes with it.
DEJAVU_SANS = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
NOTDEF_PROBE = "\U0010ffff"      # a noncharacter: every font draws its missing-glyph box for it
UNCERTAINTY_MIN_SIDE = 256       # uncertainty maps are enlarged to at least this
SHEET_TILE = 192                 # px of every tile of the contact sheet
MAX_AXIS_LABEL = 180             # px of a confusion-matrix axis label before it is cut

# Anchors of a perceptually ordered dark-to-bright map (black, purple, red, orange, pale yellow).
HEAT_ANCHORS = np.array([
    (0, 0, 4), (60, 9, 101), (135, 33, 107), (203, 71, 72), (246, 138, 20), (252, 254, 164),
], dtype=np.float64)


# -- palette -----------------------------------------------------------------------------------
def class_color(c: int) -> tuple[int, int, int]:
    """A distinct colour for class c: golden-ratio hue steps, alternating brightness."""
    hue = (c * 0.618033988749895 + 0.05) % 1.0
    sat = (0.85, 0.55, 0.95)[c % 3]
    val = (0.95, 0.80, 0.62)[(c // 3) % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def make_palette(num_classes: int, ignore_label: int | None = None) -> np.ndarray:
    """uint8 (256, 3): class c's colour at row c; the ignore label and unused indices black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for c in range(min(num_classes, 256)):
        palette[c] = class_color(c)
    if ignore_label is not None and 0 <= ignore_label < 256 and ignore_label >= num_classes:
        palette[ignore_label] = IGNORE_RGB
    return palette


def palette_json(palette: np.ndarray, num_classes: int, ignore_label: int,
                 class_names: Sequence[str] = ()) -> dict:
    classes = [{"index": c, "name": class_name(class_names, c),
                "rgb": [int(v) for v in palette[c]]} for c in range(num_classes)]
    return {"num_classes": num_classes, "ignore_label": ignore_label, "classes": classes,
            "palette": palette.reshape(-1).astype(int).tolist()}


def class_names(*sources: Sequence[str] | None) -> tuple[str, ...]:
    """The class names to show: the first of ``sources`` that names any (a run's recorded
    names, then its config's; a call's, then predict.json's); () when none does. Names a
    source lacks are ``class_name``'s."""
    return next((tuple(names) for names in sources if names), ())


def class_name(class_names: Sequence[str], c: int) -> str:
    """Class ``c``'s name: ``class_names[c]``, else ``class_<c>``."""
    return class_names[c] if c < len(class_names) else f"class_{c}"


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) colours of a uint8 (H, W) label map."""
    return palette[labels.astype(np.uint8)]


def label_png(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A mode "P" image whose pixel values are the class indices."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    im.putpalette(palette.reshape(-1).astype(np.uint8).tolist())
    return im


def save_label_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    label_png(labels, palette).save(path, optimize=False)


# -- text ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    """The font of every picture at ``size`` px: DejaVu Sans where the system has it
    (:data:`DEJAVU_SANS`), else Pillow's bundled FreeType font (ASCII only), else Pillow's fixed
    bitmap font (Pillow < 10.1 or no FreeType). Cached per size."""
    if DEJAVU_SANS.is_file():
        try:
            return ImageFont.truetype(str(DEJAVU_SANS), size)
        except (OSError, ImportError):   # unreadable file, or Pillow without FreeType
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def _glyph(fnt: ImageFont.FreeTypeFont, ch: str) -> tuple:
    mask = fnt.getmask(ch)
    return mask.size, bytes(mask)


def missing_glyphs(text: str, fnt) -> str:
    """The characters of ``text`` (each once, in order) that ``fnt`` has no glyph for: FreeType
    draws them as its missing-glyph box, Pillow's bitmap font cannot draw them (beyond Latin-1)
    and :func:`_fit_text` writes '?' for them."""
    chars = [ch for ch in dict.fromkeys(str(text)) if not ch.isspace()]
    if not isinstance(fnt, ImageFont.FreeTypeFont):
        return "".join(ch for ch in chars if ord(ch) > 0xFF)
    box = _glyph(fnt, NOTDEF_PROBE)
    return "".join(ch for ch in chars if _glyph(fnt, ch) == box)


def note_unreadable(names: Sequence[str], size: int = LEGEND_FONT) -> list[str]:
    """Log one note naming the ``names`` with characters the pictures' font lacks (they are drawn
    as boxes or '?'); return those names. Called once per picture a run writes with class names
    (the contact sheet, the confusion matrix), not per overlay."""
    fnt = font(size)
    unreadable = [str(n) for n in names if missing_glyphs(display_name(n), fnt)]
    if unreadable:
        lacking = "".join(dict.fromkeys("".join(missing_glyphs(display_name(n), fnt)
                                                for n in unreadable)))
        family = (" ".join(fnt.getname()) if isinstance(fnt, ImageFont.FreeTypeFont)
                  else "Pillow's bitmap font")
        log.warning("note: the pictures' font (%s) has no glyph for %r; these class names are "
                    "drawn with boxes or '?': %s", family, lacking, ", ".join(unreadable))
    return unreadable


def display_name(name: str) -> str:
    """Part names such as "head***eye***iris" read better as "head/eye/iris"."""
    return str(name).replace("***", "/")


def class_label(c: int, class_names: Sequence[str] = ()) -> str:
    """"<index> <name>", as legends and the confusion matrix write a class."""
    return f"{c} {display_name(class_name(class_names, c))}"


def _line_height(fnt) -> int:
    return _PROBE.textbbox((0, 0), "Hg", font=fnt)[3] + 4


def _text_width(text: str, fnt) -> int:
    return int(np.ceil(_PROBE.textlength(text, font=fnt)))


def _fit_text(text: str, fnt, max_width: int) -> str:
    """``text``, cut and ended with ".." where it is wider than ``max_width`` pixels; with
    Pillow's bitmap font, characters it cannot draw become '?'."""
    if not isinstance(fnt, ImageFont.FreeTypeFont):
        text = "".join("?" if ord(ch) > 0xFF else ch for ch in text)
    if _text_width(text, fnt) <= max_width:
        return text
    while len(text) > 1 and _text_width(text + "..", fnt) > max_width:
        text = text[:-1]
    return text + ".."


_PROBE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


# -- overlay and legend ----------------------------------------------------------------------
def blend(image: np.ndarray | None, labels: np.ndarray, palette: np.ndarray,
          alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the colour mask over ``image`` (grey when None; resized to the mask)."""
    height, width = labels.shape
    if image is None:
        image = np.full((height, width, 3), GREY_RGB, dtype=np.uint8)
    elif image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    colours = colorize(labels, palette).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def legend_entries(counts: np.ndarray, palette: np.ndarray, class_names: Sequence[str] = (),
                   num_classes: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) of every class with a pixel in ``counts`` (a bincount), largest first."""
    limit = num_classes if num_classes is not None else 256
    order = np.argsort(-np.asarray(counts), kind="stable")
    return [(class_label(int(c), class_names), tuple(int(v) for v in palette[c]))
            for c in order if counts[c] > 0 and c < limit]


def legend_panel(entries: Sequence[tuple[str, tuple[int, int, int]]], height: int | None = None,
                 width: int = LEGEND_WIDTH, title: str = "") -> Image.Image:
    """A white panel listing (label, colour) entries, one a line. With ``height``, entries that
    do not fit end in a "+N more" line; without, the panel is as tall as its entries."""
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    swatch = line - 4
    pad = 6
    top = pad + (line if title else 0)
    shown: list = list(entries)
    if height is None:
        height = top + line * max(1, len(shown)) + pad
    else:
        fit = max(1, (height - top - pad) // line)
        if len(shown) > fit:
            rest = len(shown) - (fit - 1)
            shown = shown[:fit - 1] + [(f"+{rest} more", None)]
    panel = Image.new("RGB", (width, height), PANEL_RGB)
    draw = ImageDraw.Draw(panel)
    if title:
        draw.text((pad, pad), _fit_text(title, fnt, width - 2 * pad), fill=TEXT_RGB, font=fnt)
    text_x = pad + swatch + 5
    for k, (label, colour) in enumerate(shown):
        y = top + k * line
        if colour is not None:
            draw.rectangle((pad, y + 1, pad + swatch - 1, y + swatch), fill=tuple(colour),
                           outline=(90, 90, 90))
        draw.text((text_x, y), _fit_text(label, fnt, width - text_x - 2), fill=TEXT_RGB,
                  font=fnt)
    return panel


def overlay(image: np.ndarray | None, labels: np.ndarray, palette: np.ndarray,
            class_names: Sequence[str] = (), num_classes: int | None = None,
            alpha: float = 0.5, legend: bool = True, min_side: int = 0) -> np.ndarray:
    """uint8 (H, W + LEGEND_WIDTH, 3): the colour mask blended over ``image`` (grey when None)
    and, in a panel to its right, never on the picture, a legend of the classes present,
    largest first. ``legend=False``: the (H, W, 3) blend alone. ``min_side``: a smaller mask is
    enlarged by a whole factor first (labels nearest, image bilinear), so it stays legible."""
    if min_side and min(labels.shape) < min_side:
        factor = -(-min_side // min(labels.shape))
        labels = labels.repeat(factor, axis=0).repeat(factor, axis=1)
    out = blend(image, labels, palette, alpha)
    if not legend:
        return out
    counts = np.bincount(labels.ravel(), minlength=256)
    panel = legend_panel(legend_entries(counts, palette, class_names, num_classes), out.shape[0])
    return np.concatenate([out, np.asarray(panel)], axis=1)


# -- heat maps and colour bars -----------------------------------------------------------------
def heatmap(values: np.ndarray, vmax: float | None = None, vmin: float = 0.0) -> np.ndarray:
    """uint8 (H, W, 3): ``values`` mapped through a dark-to-bright colour map on [vmin, vmax]."""
    values = np.asarray(values, dtype=np.float64)
    if vmax is None:
        vmax = float(values.max()) if values.size else 1.0
    span = vmax - vmin if vmax > vmin else 1.0
    x = np.clip((values - vmin) / span, 0.0, 1.0) * (len(HEAT_ANCHORS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(HEAT_ANCHORS) - 2)
    frac = (x - lo)[..., None]
    rgb = HEAT_ANCHORS[lo] * (1.0 - frac) + HEAT_ANCHORS[lo + 1] * frac
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def colour_bar(width: int, vmin: float, vmax: float, labels: Sequence[str] | None = None,
               bar_height: int = 12) -> Image.Image:
    """A horizontal bar of the heat map from ``vmin`` (left) to ``vmax`` (right), on white,
    with its end values (or ``labels``: left, middle, right) written under it."""
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    im = Image.new("RGB", (width, bar_height + 2 + line), PANEL_RGB)
    ramp = heatmap(np.linspace(vmin, vmax, width)[None, :], vmax, vmin)
    im.paste(Image.fromarray(np.repeat(ramp, bar_height, axis=0)), (0, 0))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width - 1, bar_height - 1), outline=(90, 90, 90))
    if labels is None:
        labels = (format_number(vmin), format_number((vmin + vmax) / 2), format_number(vmax))
    left, middle, right = labels
    y = bar_height + 1
    draw.text((0, y), left, fill=TEXT_RGB, font=fnt)
    draw.text(((width - _text_width(middle, fnt)) // 2, y), middle, fill=TEXT_RGB, font=fnt)
    draw.text((width - _text_width(right, fnt) - 1, y), right, fill=TEXT_RGB, font=fnt)
    return im


def format_number(v: float) -> str:
    """A colour-bar tick: two decimals at most, no trailing zeros."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if v != 0 else "0"


def _heat_panel(values: np.ndarray, vmax: float, caption: str, scale_note: str,
                factor: int) -> Image.Image:
    """Caption above, heat map (enlarged ``factor`` x, nearest), colour bar below."""
    fnt = font(CAPTION_FONT)
    line = _line_height(fnt)
    big = heatmap(values, vmax).repeat(factor, axis=0).repeat(factor, axis=1)
    height, width = big.shape[:2]
    bar = colour_bar(width, 0.0, vmax,
                     ("0", format_number(vmax / 2), f"{format_number(vmax)} {scale_note}"))
    panel = Image.new("RGB", (width, line + height + 4 + bar.height), PANEL_RGB)
    ImageDraw.Draw(panel).text((0, 1), _fit_text(caption, fnt, width), fill=TEXT_RGB, font=fnt)
    panel.paste(Image.fromarray(big), (0, line))
    panel.paste(bar, (0, line + height + 4))
    return panel


def uncertainty_limits(num_classes: int, num_members: int
                       ) -> tuple[tuple[float, str], tuple[float, str]]:
    """The largest possible entropy (ln C) and members' JSD (ln min(K, C)), in nats, each with
    how it is written at the end of its colour bar ("= ln 34")."""
    classes = max(num_classes, 2)
    members = max(min(num_members, num_classes), 2)
    return ((float(np.log(classes)), f"= ln {classes}"),
            (float(np.log(members)), f"= ln {members}"))


def uncertainty_image(entropy: np.ndarray, jsd: np.ndarray, num_classes: int,
                      num_members: int, min_side: int = UNCERTAINTY_MIN_SIDE) -> Image.Image:
    """Entropy of the mean and the members' Jensen-Shannon divergence, side by side, each
    enlarged by a whole factor to at least ``min_side`` px with its caption above and colour
    bar below. Each is scaled to its largest possible value (ln C for the entropy, ln min(K, C)
    for the divergence), so the maps of different images compare."""
    factor = max(1, -(-min_side // max(1, min(entropy.shape))))
    (ent_max, ent_note), (jsd_max, jsd_note) = uncertainty_limits(num_classes, num_members)
    left = _heat_panel(entropy, ent_max, f"entropy (nats), mean {float(np.mean(entropy)):.3f}",
                       ent_note, factor)
    right = _heat_panel(jsd, jsd_max, f"members' JSD (nats), mean {float(np.mean(jsd)):.3f}",
                        jsd_note, factor)
    pad, gap = 8, 16
    sheet = Image.new("RGB", (left.width + right.width + gap + 2 * pad,
                              max(left.height, right.height) + 2 * pad), PANEL_RGB)
    sheet.paste(left, (pad, pad))
    sheet.paste(right, (pad + left.width + gap, pad))
    return sheet


# -- contact sheet -----------------------------------------------------------------------------
def _fit_size(height: int, width: int, box: int) -> tuple[int, int]:
    """(width, height) of a height x width picture scaled to fit a box x box tile."""
    scale = box / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def contact_sheet(rows: Sequence[tuple[str, np.ndarray | None, np.ndarray]],
                  palette: np.ndarray, class_names: Sequence[str] = (),
                  num_classes: int | None = None, tile: int = SHEET_TILE) -> Image.Image:
    """One row per image: image | prediction | overlay, each scaled to fit one tile x tile
    square, the image's name on its own line above the row, and one legend of every class in
    the sheet in a panel to the right of all pictures.

    ``rows`` are (name, image RGB or None (drawn grey), uint8 label map).
    """
    note_unreadable(class_names)
    fnt = font(CAPTION_FONT)
    line = _line_height(fnt)
    pad = 8
    body_w = 3 * tile + 4 * pad
    counts = np.zeros(256, dtype=np.int64)
    for _, _, labels in rows:
        counts += np.bincount(labels.ravel(), minlength=256)
    legend = legend_panel(legend_entries(counts, palette, class_names, num_classes),
                          title="classes, largest first")
    body_h = line + pad + len(rows) * (line + tile + pad)
    sheet = Image.new("RGB", (body_w + legend.width, max(body_h, legend.height + line + pad)),
                      PANEL_RGB)
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("image", "prediction", "overlay")):
        draw.text((pad + k * (tile + pad), 2), title, fill=TEXT_RGB, font=fnt)
    sheet.paste(legend, (body_w, line + pad))
    y = line + pad
    for name, image, labels in rows:
        draw.text((pad, y), _fit_text(name, fnt, body_w - 2 * pad), fill=TEXT_RGB, font=fnt)
        y += line
        # At the image's aspect, also for a prediction at the model's (square) size.
        height, width = image.shape[:2] if image is not None else labels.shape
        size = _fit_size(height, width, tile)
        big_labels = resize_mask(labels, (size[1], size[0]))
        if image is None:
            picture = np.full((size[1], size[0], 3), GREY_RGB, dtype=np.uint8)
        else:
            picture = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        tiles = (picture, colorize(big_labels, palette), blend(picture, big_labels, palette))
        for k, t in enumerate(tiles):
            x = pad + k * (tile + pad) + (tile - size[0]) // 2
            sheet.paste(Image.fromarray(t), (x, y + (tile - size[1]) // 2))
        y += tile + pad
    return sheet


# -- confusion matrix --------------------------------------------------------------------------
def confusion_image(matrix: np.ndarray, row_labels: Sequence[str] = (),
                    col_labels: Sequence[str] = ()) -> Image.Image:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as a heat map,
    with the class labels on both axes (columns' written upwards) and a colour scale. Rows
    without ground-truth pixels are grey."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    sums = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    cell = int(np.clip(720 // max(rows, cols, 1), 12, 32))
    labels_r = [str(s) for s in row_labels] or [str(i) for i in range(rows)]
    labels_c = [str(s) for s in col_labels] or [str(i) for i in range(cols)]
    note_unreadable(list(dict.fromkeys(labels_r + labels_c)))
    labels_r = [_fit_text(s, fnt, MAX_AXIS_LABEL) for s in labels_r]
    labels_c = [_fit_text(s, fnt, MAX_AXIS_LABEL) for s in labels_c]
    pad = 8
    left = pad + line + max(_text_width(s, fnt) for s in labels_r) + 6
    top = pad + line + max(_text_width(s, fnt) for s in labels_c) + 6
    grid_w, grid_h = cols * cell, rows * cell
    bar_x = left + grid_w + 16
    bar_h = max(grid_h, 120)
    width = bar_x + 14 + 6 + _text_width("1.0", fnt) + pad + _text_width("of row", fnt)
    height = top + max(grid_h, bar_h) + 2 * line + 2 * pad
    sheet = Image.new("RGB", (width, height), PANEL_RGB)
    grid = heatmap(norm, 1.0)
    grid[sums[:, 0] == 0] = NO_DATA_RGB
    sheet.paste(Image.fromarray(grid).resize((grid_w, grid_h), Image.NEAREST), (left, top))
    draw = ImageDraw.Draw(sheet)
    _confusion_axes(sheet, draw, labels_r, labels_c, (left, top), cell, grid_h, pad)
    _confusion_scale(sheet, draw, bar_x, top, bar_h)
    foot = top + max(grid_h, bar_h) + pad
    draw.text((pad, foot), "rows: ground truth, columns: prediction; each row is divided by "
              "its ground-truth pixels", fill=TEXT_RGB, font=fnt)
    if (sums == 0).any():
        draw.text((pad, foot + line), "grey rows: no ground-truth pixels of that class",
                  fill=TEXT_RGB, font=fnt)
    return sheet


def _confusion_axes(sheet: Image.Image, draw: ImageDraw.ImageDraw, labels_r: list[str],
                    labels_c: list[str], corner: tuple[int, int], cell: int, grid_h: int,
                    pad: int) -> None:
    """The class labels beside the rows and above the columns (upwards), and the two titles."""
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    left, top = corner
    # Labels only every step-th row/column where cells are lower than a line of text.
    step = max(1, -(-line // cell))
    for r in range(0, len(labels_r), step):
        text = labels_r[r]
        draw.text((left - 4 - _text_width(text, fnt), top + r * cell + (cell - line) // 2 + 1),
                  text, fill=TEXT_RGB, font=fnt)
    for c in range(0, len(labels_c), step):
        strip = _upwards(labels_c[c], fnt, line)  # reads upwards, ends at the grid
        sheet.paste(strip, (left + c * cell + (cell - line) // 2, top - 4 - strip.height))
    draw.text((left, pad), "prediction", fill=TEXT_RGB, font=fnt)
    title = _upwards("ground truth", fnt, line)
    sheet.paste(title, (pad, top + max(0, (grid_h - title.height) // 2)))


def _upwards(text: str, fnt, line: int) -> Image.Image:
    strip = Image.new("RGB", (_text_width(text, fnt) + 2, line), PANEL_RGB)
    ImageDraw.Draw(strip).text((0, 1), text, fill=TEXT_RGB, font=fnt)
    return strip.rotate(90, expand=True)


def _confusion_scale(sheet: Image.Image, draw: ImageDraw.ImageDraw, bar_x: int, top: int,
                     bar_h: int) -> None:
    """The colour scale: 1 at the top, 0 at the bottom."""
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    ramp = heatmap(np.linspace(1.0, 0.0, bar_h)[:, None], 1.0)
    sheet.paste(Image.fromarray(np.repeat(ramp, 14, axis=1)), (bar_x, top))
    draw.rectangle((bar_x, top, bar_x + 13, top + bar_h - 1), outline=(90, 90, 90))
    for value, y in (("1.0", top), ("0.5", top + bar_h // 2 - line // 2),
                     ("0.0", top + bar_h - line)):
        draw.text((bar_x + 20, y), value, fill=TEXT_RGB, font=fnt)
    draw.text((bar_x, top - 2 * line), "share", fill=TEXT_RGB, font=fnt)
    draw.text((bar_x, top - line), "of row", fill=TEXT_RGB, font=fnt)


def value_grid(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
               title: str, note: str = "", fmt: str = "{:.1f}") -> Image.Image:
    """A heat map of a small table with each value written in its cell (``ddpmseg sweep``'s
    steps x blocks mIoU), the labels on both axes and a colour scale from the lowest to the
    highest value."""
    values = np.asarray(values, dtype=np.float64)
    rows, cols = values.shape
    fnt = font(LEGEND_FONT)
    line = _line_height(fnt)
    pad = 8
    cell_w = max(_text_width(fmt.format(v), fnt) for v in values.ravel()) + 16
    cell_w = max(cell_w, max(_text_width(s, fnt) for s in col_labels) + 8, 48)
    cell_h = line + 14
    left = pad + max(_text_width(s, fnt) for s in row_labels) + 8
    top = pad + 2 * line + 6
    vmin, vmax = float(values.min()), float(values.max())
    grid = heatmap(values, vmax, vmin)
    bar_x = left + cols * cell_w + 16
    width = max(bar_x + 14 + 8 + _text_width(fmt.format(vmax), fnt) + pad,
                left + _text_width(title, fnt) + pad)
    height = top + rows * cell_h + 2 * line + 2 * pad
    sheet = Image.new("RGB", (width, height), PANEL_RGB)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), title, fill=TEXT_RGB, font=fnt)
    for c, label in enumerate(col_labels):
        draw.text((left + c * cell_w + (cell_w - _text_width(label, fnt)) // 2, top - line - 2),
                  label, fill=TEXT_RGB, font=fnt)
    for r, label in enumerate(row_labels):
        y = top + r * cell_h
        draw.text((left - 6 - _text_width(label, fnt), y + (cell_h - line) // 2), label,
                  fill=TEXT_RGB, font=fnt)
        for c in range(cols):
            x = left + c * cell_w
            rgb = tuple(int(v) for v in grid[r, c])
            draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=rgb,
                           outline=PANEL_RGB)
            # Dark text on bright cells, white on dark ones.
            ink = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
            text = fmt.format(values[r, c])
            draw.text((x + (cell_w - _text_width(text, fnt)) // 2, y + (cell_h - line) // 2),
                      text, fill=ink, font=fnt)
    bar_h = rows * cell_h
    ramp = heatmap(np.linspace(vmax, vmin, bar_h)[:, None], vmax, vmin)
    sheet.paste(Image.fromarray(np.repeat(ramp, 14, axis=1)), (bar_x, top))
    draw.rectangle((bar_x, top, bar_x + 13, top + bar_h - 1), outline=(90, 90, 90))
    draw.text((bar_x + 20, top), fmt.format(vmax), fill=TEXT_RGB, font=fnt)
    draw.text((bar_x + 20, top + bar_h - line), fmt.format(vmin), fill=TEXT_RGB, font=fnt)
    if note:
        draw.text((pad, top + bar_h + pad), note, fill=TEXT_RGB, font=fnt)
    return sheet

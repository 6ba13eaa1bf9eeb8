"""Pictures of predictions: class palette, palette PNGs, overlays with a legend, heat maps,
the contact sheet and the confusion-matrix image. PIL only (default font), no matplotlib.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_RGB = (0, 0, 0)
GREY_RGB = (128, 128, 128)

# Anchors of a perceptually ordered dark-to-bright map (black, purple, red, orange, pale yellow).
_HEAT_ANCHORS = np.array([
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
    classes = [{"index": c, "name": _name(class_names, c), "rgb": [int(v) for v in palette[c]]}
               for c in range(num_classes)]
    return {"num_classes": num_classes, "ignore_label": ignore_label, "classes": classes,
            "palette": palette.reshape(-1).astype(int).tolist()}


def save_palette(path: str | Path, palette: np.ndarray, num_classes: int, ignore_label: int,
                 class_names: Sequence[str] = ()) -> None:
    Path(path).write_text(json.dumps(palette_json(palette, num_classes, ignore_label,
                                                  class_names), indent=1) + "\n")


def _name(class_names: Sequence[str], c: int) -> str:
    return class_names[c] if c < len(class_names) else f"class_{c}"


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) colours of a uint8 (H, W) label map."""
    return palette[labels.astype(np.uint8)]


def label_png(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A mode "P" image whose pixel values are the class indices."""
    im = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint8)), mode="P")
    im.putpalette(palette.reshape(-1).astype(np.uint8).tolist())
    return im


def save_label_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    label_png(labels, palette).save(path, optimize=False)


# -- overlay and legend ------------------------------------------------------------------------
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while len(text) > 1 and draw.textlength(text + "..", font=font) > max_width:
        text = text[:-1]
    return text + ".."


def draw_legend(im: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]],
                max_width_frac: float = 0.5, max_height_frac: float = 0.5) -> Image.Image:
    """Draw (name, colour) entries in a translucent box at the top-left corner of ``im``,
    within the given fractions of its width and height (then "+N more")."""
    if not entries:
        return im
    font = _font()
    base = im.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    text_h = draw.textbbox((0, 0), "Hg", font=font)[3]
    line = max(text_h + 3, 8)
    sw = line - 3
    pad = 3
    max_lines = max(1, (int(base.height * max_height_frac) - 2 * pad) // line)
    shown = list(entries)
    if len(shown) > max_lines:
        rest = len(shown) - (max_lines - 1)
        shown = shown[:max_lines - 1] + [(f"+{rest} more", None)]
    max_text = max(8, int(base.width * max_width_frac) - sw - 3 * pad)
    labels = [_fit_text(draw, name, font, max_text) for name, _ in shown]
    width = sw + 2 * pad + pad + max(int(draw.textlength(t, font=font)) for t in labels)
    height = 2 * pad + line * len(shown)
    draw.rectangle((0, 0, min(width, base.width - 1), min(height, base.height - 1)),
                   fill=(0, 0, 0, 150))
    for k, (label, (_, colour)) in enumerate(zip(labels, shown)):
        y = pad + k * line
        if colour is not None:
            draw.rectangle((pad, y + 1, pad + sw - 1, y + sw), fill=tuple(colour) + (255,),
                           outline=(255, 255, 255, 255))
        draw.text((2 * pad + sw, y), label, fill=(255, 255, 255, 255), font=font)
    return Image.alpha_composite(base, layer).convert("RGB")


def overlay(image: np.ndarray | None, labels: np.ndarray, palette: np.ndarray,
            class_names: Sequence[str] = (), num_classes: int | None = None,
            alpha: float = 0.5, legend: bool = True, min_side: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): the colour mask blended over ``image`` (grey when None), with a legend
    of the classes present, largest first. ``min_side``: a smaller mask is enlarged by a whole
    factor first (labels nearest, image bilinear), so a 64px result stays legible."""
    if min_side and min(labels.shape) < min_side:
        factor = -(-min_side // min(labels.shape))
        labels = labels.repeat(factor, axis=0).repeat(factor, axis=1)
    height, width = labels.shape
    if image is None:
        image = np.full((height, width, 3), GREY_RGB, dtype=np.uint8)
    elif image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    colours = colorize(labels, palette).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if not legend:
        return out
    counts = np.bincount(labels.ravel(), minlength=256)
    limit = num_classes if num_classes is not None else 256
    present = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0 and c < limit]
    # Part names such as "head***eye***iris" read better as "head/eye/iris".
    entries = [(f"{c} {_name(class_names, int(c)).replace('***', '/')}",
                tuple(int(v) for v in palette[c])) for c in present]
    return np.asarray(draw_legend(Image.fromarray(out), entries))


# -- heat maps ---------------------------------------------------------------------------------
def heatmap(values: np.ndarray, vmax: float | None = None, vmin: float = 0.0) -> np.ndarray:
    """uint8 (H, W, 3): ``values`` mapped through a dark-to-bright colour map on [vmin, vmax]."""
    values = np.asarray(values, dtype=np.float64)
    if vmax is None:
        vmax = float(values.max()) if values.size else 1.0
    span = vmax - vmin if vmax > vmin else 1.0
    x = np.clip((values - vmin) / span, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(_HEAT_ANCHORS) - 2)
    frac = (x - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1.0 - frac) + _HEAT_ANCHORS[lo + 1] * frac
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _caption(im: Image.Image, text: str) -> Image.Image:
    font = _font()
    draw = ImageDraw.Draw(im)
    box = draw.textbbox((2, 1), text, font=font)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)
    return im


def uncertainty_image(entropy: np.ndarray, jsd: np.ndarray, num_classes: int,
                      num_members: int) -> Image.Image:
    """Entropy and JS-divergence heat maps side by side, each on its largest possible value
    (log C for the entropy, log min(K, C) for the divergence) so images compare."""
    height, width = entropy.shape
    ent_max = float(np.log(max(num_classes, 2)))
    jsd_max = float(np.log(max(min(num_members, num_classes), 2)))
    gap = 4
    sheet = Image.new("RGB", (2 * width + gap, height), (255, 255, 255))
    sheet.paste(_caption(Image.fromarray(heatmap(entropy, ent_max)), "entropy"), (0, 0))
    sheet.paste(_caption(Image.fromarray(heatmap(jsd, jsd_max)), "JSD"), (width + gap, 0))
    return sheet


# -- contact sheet -----------------------------------------------------------------------------
def contact_sheet(rows: Sequence[tuple[str, np.ndarray | None, np.ndarray, np.ndarray]],
                  max_tile: int = 256) -> Image.Image:
    """One row per image: image | prediction | overlay, with the image's name above the row.

    ``rows`` are (name, image RGB or None, prediction RGB, overlay RGB).
    """
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Hg", font=font)[3] + 4
    pad = 4
    heights = [r[2].shape[0] for r in rows]
    widths = [r[2].shape[1] for r in rows]
    scale = min(1.0, max_tile / max(max(heights), max(widths)))
    tile_w = max(1, round(max(widths) * scale))
    tile_h = max(1, round(max(heights) * scale))
    sheet_w = 3 * tile_w + 4 * pad
    sheet_h = text_h + pad + len(rows) * (text_h + tile_h + pad)
    sheet = Image.new("RGB", (sheet_w, sheet_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("image", "prediction", "overlay")):
        draw.text((pad + k * (tile_w + pad), 2), title, fill=(0, 0, 0), font=font)
    y = text_h + pad
    for name, image, pred, over in rows:
        draw.text((pad, y), _fit_text(draw, name, font, sheet_w - 2 * pad), fill=(0, 0, 0),
                  font=font)
        y += text_h
        if image is None:
            image = np.full_like(pred, 128)
        for k, tile in enumerate((image, pred, over)):
            th = max(1, round(tile.shape[0] * scale))
            tw = max(1, round(tile.shape[1] * scale))
            im = Image.fromarray(tile).resize((tw, th), Image.NEAREST if k == 1 else
                                              Image.BILINEAR)
            sheet.paste(im, (pad + k * (tile_w + pad), y))
        y += tile_h + pad
    return sheet


# -- confusion matrix --------------------------------------------------------------------------
def confusion_image(matrix: np.ndarray, row_labels: Sequence[str] = (),
                    col_labels: Sequence[str] = ()) -> Image.Image:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) as a heat map
    with the class indices along the axes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    sums = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)
    cell = int(max(6, min(24, 640 // max(rows, cols, 1))))
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels_r = list(row_labels) or [str(i) for i in range(rows)]
    labels_c = list(col_labels) or [str(i) for i in range(cols)]
    margin_l = 6 + max(int(probe.textlength(s, font=font)) for s in labels_r)
    text_h = probe.textbbox((0, 0), "Hg", font=font)[3] + 2
    margin_t = text_h + 4
    grid = Image.fromarray(heatmap(norm, 1.0)).resize((cols * cell, rows * cell), Image.NEAREST)
    foot = 2 * text_h + 4
    sheet = Image.new("RGB", (margin_l + cols * cell + 4, margin_t + rows * cell + foot),
                      (255, 255, 255))
    sheet.paste(grid, (margin_l, margin_t))
    draw = ImageDraw.Draw(sheet)
    step = max(1, int(np.ceil((text_h + 2) / cell)))
    for r in range(0, rows, step):
        draw.text((2, margin_t + r * cell + (cell - text_h) // 2), labels_r[r], fill=(0, 0, 0),
                  font=font)
    col_step = max(1, int(np.ceil(
        (max(probe.textlength(s, font=font) for s in labels_c) + 3) / cell)))
    for c in range(0, cols, col_step):
        draw.text((margin_l + c * cell, 2), labels_c[c], fill=(0, 0, 0), font=font)
    draw.text((2, margin_t + rows * cell + 2), "rows: ground truth, columns: prediction",
              fill=(0, 0, 0), font=font)
    draw.text((2, margin_t + rows * cell + 2 + text_h), "row-normalised", fill=(0, 0, 0),
              font=font)
    return sheet

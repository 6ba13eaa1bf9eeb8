"""CVAT's "Segmentation mask 1.1" export and Pascal VOC: class masks as colour PNGs.

The export is a folder (or its .zip unpacked) with ``SegmentationClass/<image>.png``, colour or
palette PNGs whose colours ``labelmap.txt`` names (``name:r,g,b:parts:actions`` lines; ``#``
starts a comment). Without a labelmap.txt (``voc``), VOC's own 21 classes and colours are
used, and VOC's void colour (224, 224, 192) is left unlabelled. A colour no label names is an
error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpmseg.core.errors import BadInputError, InputNotFoundError
from ddpmseg.data import IMAGE_SUFFIXES, decode
from ddpmseg.interop.labels.common import Annotation, Region

LABELMAP = "labelmap.txt"
CLASS_DIR = "SegmentationClass"
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_VOID = (224, 224, 192)


def voc_colour(index: int) -> tuple[int, int, int]:
    """VOC's colour of class ``index`` (its bit-interleaved colour map)."""
    rgb = [0, 0, 0]
    for shift in range(8):
        for channel in range(3):
            rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return tuple(rgb)


def read_labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    """Colour -> label name from CVAT's labelmap.txt."""
    colours = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            name, rgb = line.split(":")[:2]
            colour = tuple(int(v) for v in rgb.split(","))
            if len(colour) != 3:
                raise BadInputError(rgb)
        except ValueError as exc:
            raise BadInputError(f"{path}:{number} is not 'name:r,g,b:parts:actions' ({line!r})",
                                "export the labelmap again") from exc
        colours[colour] = name
    return colours


def read(src: str | Path) -> list[Annotation]:
    src = Path(src)
    folder = src / CLASS_DIR
    if not folder.is_dir():
        raise InputNotFoundError(f"{src} has no {CLASS_DIR} folder",
                                 "give the unpacked \"Segmentation mask 1.1\" export of CVAT")
    labelmap = src / LABELMAP
    if labelmap.is_file():
        colours, void = read_labelmap(labelmap), None
    else:
        colours, void = {voc_colour(i): n for i, n in enumerate(VOC_CLASSES)}, VOC_VOID
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [_annotation(p, colours, void) for p in files]


def _annotation(path: Path, colours: dict, void) -> Annotation:
    rgb = np.asarray(decode(path).convert("RGB"))
    rgb32 = rgb.astype(np.int32)
    packed = (rgb32[..., 0] << 16) | (rgb32[..., 1] << 8) | rgb32[..., 2]
    codes = {(r << 16) | (g << 8) | b: name for (r, g, b), name in colours.items()}
    present = np.unique(packed).tolist()
    void_code = None if void is None else (void[0] << 16) | (void[1] << 8) | void[2]
    unknown = [p for p in present if p not in codes and p != void_code]
    if unknown:
        shown = ", ".join(f"({p >> 16}, {(p >> 8) & 255}, {p & 255})" for p in unknown[:5])
        raise BadInputError(f"{path} has colour(s) no label names: {shown}",
                            f"add them to {LABELMAP}, or export again")
    regions = [Region(codes[p], packed == p) for p in present if p in codes]
    return Annotation(path.name, rgb.shape[:2], regions)

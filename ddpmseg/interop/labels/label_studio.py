"""Label Studio: brush masks in and out.

Label Studio keeps a brush mask as RLE of the RGBA image (4 bytes a pixel, row by row; the
alpha byte is the mask) in the bit format of thi.ng/rle-pack, which
``label_studio_sdk.converter.brush`` implements. It is written here (``encode_rle`` /
``decode_rle``) rather than taken from label-studio-sdk because that package pulls in another
numpy, OpenCV, black and nltk; the format is small and documented:

    32 bits: number of values; 5 bits: word size - 1 (8); 4 x 4 bits: the 4 run-length widths
    - 1 (3, 4, 8, 16); then blocks: 1 bit kind (1: a run of one value, 0: literal values),
    2 bits which width, that many bits length - 1, then the value (once for a run, else each).

Import reads Label Studio's JSON export (a list of tasks, each with ``annotations``; the last
annotation that was not cancelled counts). Export writes ``tasks.json`` (each task's image
with a ``predictions`` entry: brush RLE per class and a ``score``) and ``config.xml`` (the
labelling config: the classes with their colours).
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from ddpmseg.core.errors import BadInputError, InputNotFoundError
from ddpmseg.core.fileio import write_json, atomic_write
from ddpmseg.core.version import __version__
from ddpmseg.interop.labels.common import Annotation, PredictionFolder, Region

TASKS_FILE = "tasks.json"
CONFIG_FILE = "config.xml"
FROM_NAME, TO_NAME = "tag", "image"
_WIDTHS = (3, 4, 8, 16)
_THRESHOLD = 128  # alpha at or above it is inside the brush stroke


# -- the RLE ------------------------------------------------------------------------------------

class _Bits:
    """Numbers of given bit widths, packed most significant bit first."""

    def __init__(self):
        self.values: list[int] = []
        self.widths: list[int] = []

    def put(self, value: int, bits: int) -> None:
        self.values.append(value)
        self.widths.append(bits)

    def to_bytes(self) -> bytes:
        values = np.array(self.values, dtype=np.int64)
        widths = np.array(self.widths, dtype=np.int64)
        starts = np.cumsum(widths) - widths
        bits = np.zeros(int(widths.sum()), dtype=np.uint8)
        for k in range(int(widths.max())):  # the k-th bit of every number at once
            has = widths > k
            bits[starts[has] + k] = (values[has] >> (widths[has] - 1 - k)) & 1
        return np.packbits(bits).tobytes()  # zero bits pad the last byte


def encode_rle(values: np.ndarray) -> list[int]:
    """Label Studio's RLE of a flat uint8 array (runs only, as label_studio_sdk writes)."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    out = _Bits()
    out.put(values.size, 32)
    out.put(7, 5)
    for width in _WIDTHS:
        out.put(width - 1, 4)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if values.size else []
    ends = np.r_[starts[1:], values.size] if values.size else []
    for start, end in zip(starts, ends):
        length, value = int(end - start), int(values[start])
        while length > 0:
            chunk = min(length, 1 << 16)
            kind = next(k for k, w in enumerate(_WIDTHS) if chunk <= 1 << w)
            out.put(1, 1)
            out.put(kind, 2)
            out.put(chunk - 1, _WIDTHS[kind])
            out.put(value, 8)
            length -= chunk
    return list(out.to_bytes())


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, bits: int) -> int:
        first, last = self.pos // 8, (self.pos + bits - 1) // 8
        if last >= len(self.data):
            raise BadInputError("the RLE ends early")
        chunk = int.from_bytes(self.data[first:last + 1], "big")
        shift = (last + 1) * 8 - self.pos - bits
        self.pos += bits
        return (chunk >> shift) & ((1 << bits) - 1)


def decode_rle(rle) -> np.ndarray:
    """The flat uint8 array of Label Studio's RLE (either kind of block)."""
    reader = _Reader(bytes(rle))
    num = reader.read(32)
    word = reader.read(5) + 1
    widths = [reader.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        run = reader.read(1)
        j = min(num, i + 1 + reader.read(widths[reader.read(2)]))
        if run:
            out[i:j] = reader.read(word)
        else:
            out[i:j] = [reader.read(word) for _ in range(j - i)]
        i = j
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A boolean (H, W) mask as a brush RLE: RGBA 255 inside, 0 outside."""
    return encode_rle(np.repeat(np.where(mask, 255, 0).astype(np.uint8).ravel(), 4))


def rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    values = decode_rle(rle)
    if values.size != height * width * 4:
        raise BadInputError(f"the RLE holds {values.size} values, not {height}x{width}x4")
    return values.reshape(height, width, 4)[..., 3] >= _THRESHOLD


# -- import -------------------------------------------------------------------------------------

def read(src: str | Path) -> list[Annotation]:
    """The annotations of a Label Studio JSON export (brush and its RLE)."""
    src = Path(src)
    try:
        tasks = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        raise InputNotFoundError(f"cannot read {src} ({exc})",
                                 "export the project from Label Studio as JSON") from exc
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadInputError(f"{src} is no Label Studio JSON export (a list of tasks)",
                            "export the project as JSON, or pass `fmt` for another tool")
    return [_task(task, src) for task in tasks]


def _task(task: dict, src: Path) -> Annotation:
    data = task.get("data") or {}
    ref = next((v for v in data.values() if isinstance(v, str)), None)
    if ref is None:
        raise BadInputError(f"{src}: task {task.get('id')} names no image", "export again")
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    results = [r for r in (done[-1].get("result") or [] if done else [])
               if r.get("type") == "brushlabels"]
    size = (0, 0)
    regions = []
    for result in results:
        value = result.get("value") or {}
        labels = value.get("brushlabels") or []
        if value.get("format") != "rle" or len(labels) != 1:
            raise BadInputError(f"{src}: task {task.get('id')} has a brush region without "
                                "RLE or with other than one label", "export again as JSON")
        size = (int(result["original_height"]), int(result["original_width"]))
        try:
            regions.append(Region(labels[0], rle_to_mask(value["rle"], *size)))
        except (ValueError, KeyError) as exc:
            raise BadInputError(f"{src}: task {task.get('id')}: a damaged brush RLE ({exc})",
                                "export again") from exc
    return Annotation(ref, size, regions)


# -- export -------------------------------------------------------------------------------------

def label_config(folder: PredictionFolder) -> str:
    """The labelling config: the image and a brush label per class, in its colour."""
    labels = "".join(f'    <Label value={quoteattr(name)} background="#{r:02x}{g:02x}{b:02x}"/>\n'
                     for name, (r, g, b) in zip(folder.names, folder.colours))
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}'
            f'  </BrushLabels>\n</View>\n')


def tasks(folder: PredictionFolder, url_prefix: str) -> list[dict]:
    """A task per image, with the prediction as pre-annotation."""
    out = []
    for item in folder.items:
        height, width = item.labels.shape
        result = [{"id": f"{item.name}-{c}", "from_name": FROM_NAME, "to_name": TO_NAME,
                   "type": "brushlabels", "original_width": width, "original_height": height,
                   "image_rotation": 0,
                   "value": {"format": "rle", "rle": mask_to_rle(item.labels == c),
                             "brushlabels": [folder.names[c]]}}
                  for c in np.unique(item.labels).tolist()]
        file_name = item.image.name if item.image is not None else f"{item.name}.png"
        out.append({"data": {TO_NAME: url_prefix + file_name},
                    "predictions": [{"model_version": f"ddpmseg {__version__}",
                                     "score": item.score, "result": result}]})
    return out


def write(folder: PredictionFolder, out: Path, url_prefix: str) -> list[Path]:
    config = label_config(folder)
    return [write_json(out / TASKS_FILE, tasks(folder, url_prefix)),
            atomic_write(out / CONFIG_FILE, lambda p: p.write_text(config))]

"""COCO: instance/stuff JSON in (polygons, RLE or uncompressed RLE), RLE out.

Encodings come from pycocotools (the ``[labels]`` extra). Export writes ``coco.json``: an image
per prediction, a category per class (id = class index + 1, as COCO counts from 1), and an
annotation per class present in an image (``iscrowd`` 1, compressed RLE, area, bbox, score).
Import paints a COCO file's annotations in file order (a later one wins overlaps).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ddpmseg.core.errors import BadInputError
from ddpmseg.core.fileio import write_json
from ddpmseg.interop.labels.common import Annotation, PredictionFolder, Region, needs

COCO_FILE = "coco.json"


def _mask_api():
    return needs("pycocotools.mask", "COCO segmentations")


def read(src: str | Path) -> list[Annotation]:
    src = Path(src)
    try:
        coco = json.loads(src.read_text())
        images = {im["id"]: im for im in coco["images"]}
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        anns = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot read {src} as COCO JSON ({exc!r})",
                            "give a COCO file with images, categories and annotations") from exc
    out = {i: Annotation(im["file_name"], (int(im["height"]), int(im["width"])))
           for i, im in images.items()}
    mask_api = _mask_api()
    for ann in anns:
        image, category = ann.get("image_id"), ann.get("category_id")
        if image not in out or category not in categories:
            raise BadInputError(f"{src}: annotation {ann.get('id')} refers to image {image} or "
                                f"category {category}, which the file does not list",
                                "export the file again")
        h, w = out[image].size
        out[image].regions.append(Region(categories[category],
                                         _decode(mask_api, ann.get("segmentation"), h, w, src)))
    return list(out.values())


def _decode(mask_api, seg, h: int, w: int, src: Path) -> np.ndarray:
    try:
        if isinstance(seg, list):  # polygons
            rle = mask_api.merge(mask_api.frPyObjects(seg, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed
            rle = mask_api.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):
            rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
        else:
            raise BadInputError(f"a segmentation of type {type(seg).__name__}")
        with warnings.catch_warnings():
            # pycocotools 2.0.11's decode under numpy 2 warns that its array wrapper takes no
            # `copy` keyword (numpy then copies, the values are the same).
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy",
                                    DeprecationWarning)
            mask = mask_api.decode(rle)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInputError(f"{src}: a segmentation cannot be read ({exc})",
                            "export the file again") from exc
    if mask.shape != (h, w):
        raise BadInputError(f"{src}: a segmentation of size {mask.shape} on an image of "
                            f"{(h, w)}", "export the file again")
    return mask.astype(bool)


def coco_json(folder: PredictionFolder) -> dict:
    mask_api = _mask_api()
    images, anns = [], []
    for i, item in enumerate(folder.items, 1):
        h, w = item.labels.shape
        file_name = item.image.name if item.image is not None else f"{item.name}.png"
        images.append({"id": i, "file_name": file_name, "height": h, "width": w})
        for c in np.unique(item.labels).tolist():
            rle = mask_api.encode(np.asfortranarray(item.labels == c, dtype=np.uint8))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1,
                         "iscrowd": 1, "area": int(mask_api.area(rle)),
                         "bbox": [float(v) for v in mask_api.toBbox(rle)],
                         "score": item.score,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    categories = [{"id": c + 1, "name": name, "color": list(folder.colours[c])}
                  for c, name in enumerate(folder.names)]
    return {"images": images, "categories": categories, "annotations": anns}


def write(folder: PredictionFolder, out: Path) -> list[Path]:
    return [write_json(out / COCO_FILE, coco_json(folder))]



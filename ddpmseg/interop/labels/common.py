"""What every labelling-tool format shares: classes mapped by name, regions painted into masks,
images matched to a data folder by name, masks written beside their images, and a prediction
folder read for export.

An importer turns its export into ``Annotation``s (one per image: its regions in order, each a
class name and a boolean mask); ``write_masks`` checks them all, then writes ``<id>_mask.png``
(grey, class indices, the ignore label where no region lies) beside each image under the data
folder's writer lock. Nothing is written when anything is wrong.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image

from ddpmseg.config import Config
from ddpmseg.core.errors import BadInputError, InputNotFoundError, OutputError
from ddpmseg.core.fileio import write_png
from ddpmseg.core.locking import writer_lock
from ddpmseg.data import (_some, find_image, image_hw, list_samples, mask_names, resize_mask,
                          size_text)
from ddpmseg.outputs.folder import META_FILE, check_complete, image_file
from ddpmseg.outputs.render import class_name, make_palette

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask.png"  # the name ``extract`` reads: data.mask_names
# Label Studio stores an upload as "<8 hex digits>-<original name>".
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")


def needs(module: str, what: str):
    """The optional module ``module`` (of the ``[labels]`` extra), or an error naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputNotFoundError(f"{what} needs {module.split('.')[0]}, which is not installed",
                                 "pip install 'ddpmseg[labels]'") from exc


@dataclass
class Region:
    label: str
    mask: np.ndarray  # bool (H, W)


@dataclass
class Annotation:
    """One image's regions, in the order the tool gives them (a later one wins overlaps)."""
    ref: str  # how the export names the image: a path, URL or file name
    size: tuple[int, int]  # (H, W)
    regions: list[Region] = field(default_factory=list)


def ref_name(ref: str) -> str:
    """The file name a tool's reference to an image ends in: a path, a URL, Label Studio's
    ``/data/local-files/?d=<path>`` or ``/data/upload/3/<hash>-<name>``."""
    url = urlparse(ref)
    path = url.path
    if "d" in parse_qs(url.query):
        path = parse_qs(url.query)["d"][0]
    return PurePosixPath(unquote(path).replace("\\", "/")).name


def class_indices(cfg: Config) -> dict[str, int]:
    """Class name -> index: the config's names (``class_<c>`` for unnamed classes)."""
    data = cfg.data
    return {class_name(data.class_names, c): c for c in range(data.num_classes)}


def match_images(annotations: list[Annotation], data_dir: Path) -> dict[str, Path]:
    """Each annotation's image in ``data_dir``, by file name, then by stem; an upload's
    ``<hash>-`` prefix dropped when that finds it. One error for all that match nothing."""
    samples = list_samples(data_dir)
    by_name = {s.image.name: s.image for s in samples}
    by_stem = {s.name: s.image for s in samples}
    found, missing = {}, []
    for ann in annotations:
        name = ref_name(ann.ref)
        candidates = [name]
        upload = _UPLOAD_PREFIX.match(name)
        if upload:
            candidates.append(upload.group(1))
        image = next((by_name.get(c) or by_stem.get(Path(c).stem) for c in candidates
                      if by_name.get(c) or by_stem.get(Path(c).stem)), None)
        if image is None:
            missing.append(ann.ref)
        else:
            found[ann.ref] = image
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)})" if len(missing) > 5 else "")
        raise InputNotFoundError(f"{len(missing)} annotated image(s) are not in {data_dir}: "
                                 f"{shown}", "give the data folder that holds them "
                                 "(matched by file name)")
    return found


def check_labels(annotations: list[Annotation], cfg: Config, src: Path) -> dict[str, int]:
    """Class name -> index for every name the annotations use; one error line listing both
    sides when a name is not the config's."""
    classes = class_indices(cfg)
    used = sorted({r.label for a in annotations for r in a.regions})
    unknown = [n for n in used if n not in classes]
    if unknown:
        raise BadInputError(f"{src} uses class name(s) {', '.join(map(repr, unknown))} that the "
                            f"config does not have (the config's: "
                            f"{', '.join(map(repr, classes))})",
                            "rename the labels in the tool, or give the config whose "
                            "`class_names` they are")
    return classes


def paint(ann: Annotation, classes: dict[str, int], ignore_label: int) -> tuple[np.ndarray, int]:
    """The mask of ``ann`` (uint8, ignore label where unlabelled) and how many pixels lie in
    two or more regions (the later region's class is kept)."""
    mask = np.full(ann.size, ignore_label, dtype=np.uint8)
    covered = np.zeros(ann.size, dtype=bool)
    overlaps = 0
    for region in ann.regions:
        overlaps += int(np.count_nonzero(covered & region.mask))
        covered |= region.mask
        mask[region.mask] = classes[region.label]
    return mask, overlaps


def _other_masks(image: Path) -> list[Path]:
    """Mask files of ``image`` that ``extract`` would read before ``<id>_mask.png``."""
    ours = image.with_name(image.stem + MASK_SUFFIX)
    return [image.with_name(n) for n in mask_names(image.stem)
            if image.with_name(n).is_file() and image.with_name(n) != ours]


def write_masks(annotations: list[Annotation], data_dir: str | Path, cfg: Config,
                src: str | Path) -> list[Path]:
    """Check every annotation (image found, same size, known classes, no other mask file in
    the way), then write each ``<id>_mask.png``. Returns the masks written."""
    data_dir, src = Path(data_dir), Path(src)
    empty = [a.ref for a in annotations if not a.regions]
    if empty:
        log.warning("note: %d image(s) have no annotation and were skipped: %s", len(empty),
                    _some([ref_name(r) for r in empty]))
    annotations = [a for a in annotations if a.regions]
    if not annotations:
        raise InputNotFoundError(f"{src} holds no annotated image", "label some images first")
    images = match_images(annotations, data_dir)
    classes = check_labels(annotations, cfg, src)
    problems, seen = [], set()
    for ann in annotations:
        image = images[ann.ref]
        if image in seen:
            problems.append(f"{image.name} is annotated twice (in two tasks or images)")
        seen.add(image)
        hw = image_hw(image)
        if tuple(hw) != tuple(ann.size):
            problems.append(f"{ref_name(ann.ref)} is annotated at {size_text(ann.size)} but "
                            f"{image} is {size_text(hw)}")
        problems += [f"{image.name} already has the mask {p.name}" for p in _other_masks(image)]
    if problems:
        raise BadInputError(f"cannot import {src}: " + "; ".join(problems[:3])
                            + (f"; ... ({len(problems)} problems)" if len(problems) > 3 else ""),
                            "annotate the images at their own size, and move other masks away")
    written, overlaps, overlapped = [], 0, 0
    with writer_lock(data_dir, "data folder"):
        for ann in annotations:
            mask, n = paint(ann, classes, cfg.data.ignore_label)
            overlaps, overlapped = overlaps + n, overlapped + bool(n)
            image = images[ann.ref]
            written.append(write_png(image.with_name(image.stem + MASK_SUFFIX),
                                     Image.fromarray(mask)))
    if overlaps:
        log.warning("note: %d pixel(s) in %d image(s) lie in two or more regions; each has the "
                    "later region's class", overlaps, overlapped)
    return written


# -- a prediction folder, for export ------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    name: str
    image: Path | None  # the image predicted, when the folder says where it is
    labels: np.ndarray  # uint8 (H, W) class indices
    score: float  # 1 - the mean normalised entropy of the ensemble's mean; 0 without it


@dataclass(frozen=True)
class PredictionFolder:
    names: tuple[str, ...]  # class names, by index
    colours: tuple[tuple[int, int, int], ...]  # the render palette's colour of each class
    items: tuple[Prediction, ...]


def read_predictions(pred_dir: str | Path) -> PredictionFolder:
    """The label maps of a finished `predict` with their images, classes and colours."""
    pred_dir = Path(pred_dir)
    meta = check_complete(pred_dir)
    num_classes = int(meta["num_classes"])
    names = tuple(class_name(meta.get("class_names") or (), c) for c in range(num_classes))
    palette = make_palette(num_classes, meta.get("ignore_label"))
    images = meta.get("images") or (meta.get("input") if meta.get("input_kind") == "images"
                                    else None)
    items, resized = [], []
    for name in meta["names"]:
        labels = np.load(image_file(pred_dir, name, "npy"), allow_pickle=False)
        if labels.ndim != 2 or labels.size == 0 or labels.max() >= num_classes:
            raise BadInputError(f"{pred_dir / name}.npy is no label map of {num_classes} "
                                f"classes ({META_FILE})", "rerun `ddpmseg predict`")
        image = find_image(Path(images), name) if images else None
        labels = at_image_size(labels.astype(np.uint8), image, resized)
        items.append(Prediction(name, image, labels,
                                _score(image_file(pred_dir, name, "entropy"), num_classes)))
    if resized:
        log.warning("note: %d label map(s) are not at their image's size (a `resize=True` "
                    "prediction) and were scaled to it (nearest neighbour), as labelling tools "
                    "draw masks at the image's own size: %s", len(resized), _some(resized))
    return PredictionFolder(names, tuple(tuple(int(v) for v in palette[c])
                                         for c in range(num_classes)), tuple(items))


def at_image_size(labels: np.ndarray, image: Path | None, resized: list[str]) -> np.ndarray:
    """``labels`` at the size of ``image`` (nearest neighbour; its name added to ``resized``)."""
    if image is None:
        return labels
    hw = image_hw(image)
    if tuple(hw) == labels.shape:
        return labels
    resized.append(image.name)
    return resize_mask(labels, hw)


def _score(entropy_path: Path, num_classes: int) -> float:
    """1 - mean entropy / log(K): 1 where the ensemble is sure; 0 when there is no map."""
    if not entropy_path.is_file() or num_classes < 2:
        return 0.0
    entropy = np.load(entropy_path, allow_pickle=False).astype(np.float64)
    return round(float(np.clip(1 - entropy.mean() / np.log(num_classes), 0, 1)), 6)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file", "give a folder for the export")

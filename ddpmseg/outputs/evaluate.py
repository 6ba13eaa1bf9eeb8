"""Evaluation: predicted label maps + ground truth -> per-class IoU table and mIoU.

The mIoU is the reference's (ddpm-segmentation's ``compute_iou``): intersections and unions are
summed over the whole test set, then for each class c in 0..num_classes-1 other than the ignore
label, IoU_c = |pred == c AND gt == c| / |pred == c OR gt == c| (0 when the union is empty), and
the mIoU is the mean of those. Ground-truth pixels with the ignore label are NOT masked out: a
prediction of c there counts in c's union, as in the published numbers. ``mask_ignore=True`` is
the stricter variant that drops those pixels first.

Everything is computed from one 256 x 256 confusion matrix (rows: ground truth, columns:
prediction) accumulated image by image, so memory does not grow with the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddpmseg.config import DataConfig, check_classes
from ddpmseg.core.errors import BadInputError, ConfigError, InputNotFoundError
from ddpmseg.core.fileio import is_url, write_csv, write_json, write_png
from ddpmseg.core.locking import reader_lock, writer_lock
from ddpmseg.data import (
    LOSSY_SUFFIXES,
    MASK_LIKE_ENDINGS,
    check_labels,
    is_mask_png,
    lossy_mask_error,
    mask_names,
    read_mask,
    resize_mask,
    size_text,
)
from ddpmseg.featcache.store import is_store
from ddpmseg.outputs import folder, render
from ddpmseg.outputs.folder import check_complete, list_predictions

__all__ = ["evaluate", "format_table", "iou_from_confusion", "image_iou", "confusion_matrix",
           "confusion_axis", "list_predictions", "find_ground_truth"]

log = logging.getLogger(__name__)


def find_ground_truth(gt_dir: Path, name: str, max_image_pixels: int | None = None) -> Path:
    """``<name>.npy``, ``<name>_mask.png``, ``<name>_mask.npy``, or a grey/palette ``<name>.png``."""
    for candidate in mask_names(name):
        if (gt_dir / candidate).is_file():
            return gt_dir / candidate
    png = gt_dir / f"{name}.png"
    if png.is_file() and is_mask_png(png, max_image_pixels):
        return png
    lossy = [gt_dir / f"{name}_mask{s}" for s in LOSSY_SUFFIXES]
    for path in lossy:
        if path.is_file():
            raise lossy_mask_error(path)
    others = sorted(p.name for p in gt_dir.iterdir()
                    if p.stem.startswith(name) and p.stem[len(name):] in MASK_LIKE_ENDINGS)
    raise BadInputError(f"no ground truth for prediction {name!r}: none of "
                        f"{', '.join(mask_names(name))} or a grey/palette {name}.png is in "
                        f"{gt_dir}" + (f"; {others[0]} is not one of these names"
                                       if others else ""),
                        "give the folder holding the test masks, rename the masks, or remove "
                        "the prediction")


class _StoreLabels:
    """Ground truth read from a feature store's labels (the masks `extract` stored, at the
    store's image size), looked up by image name."""

    def __init__(self, path: Path | str):
        from ddpmseg.featcache.store import FeatureStore

        self.store = FeatureStore.open(path)
        if not self.store.info.has_labels:
            raise InputNotFoundError(f"store {path} holds no labels",
                                     "give a store extracted from images with masks, or a "
                                     "folder of masks")
        self.index = {name: i for i, name in enumerate(self.store.names)}
        self.path = path

    def find(self, name: str) -> str:
        if name not in self.index:
            raise BadInputError(f"no ground truth for prediction {name!r}: store {self.path} "
                                f"has no image of that name", "give the store of the test images")
        return f"{self.path}[{name}]"

    def read(self, name: str) -> np.ndarray:
        return self.store.labels(self.index[name])




def confusion_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """int64 (256, 256): counts of (ground truth, prediction) label pairs."""
    pairs = gt.astype(np.int64).ravel() * 256 + pred.astype(np.int64).ravel()
    return np.bincount(pairs, minlength=256 * 256).reshape(256, 256)


def iou_from_confusion(conf: np.ndarray, num_classes: int, ignore_label: int,
                       mask_ignore: bool = False) -> tuple[list[dict], float]:
    """Per-class rows (index, intersection, union, gt and predicted pixels, IoU) and the mIoU."""
    conf = np.asarray(conf, dtype=np.int64)
    if mask_ignore and 0 <= ignore_label < conf.shape[0]:
        conf = conf.copy()
        conf[ignore_label, :] = 0
    rows = []
    for c in range(num_classes):
        if c == ignore_label:
            continue
        inter = int(conf[c, c])
        gt_px = int(conf[c, :].sum())
        pred_px = int(conf[:, c].sum())
        union = gt_px + pred_px - inter
        rows.append({"index": c, "iou": inter / union if union else 0.0, "gt_pixels": gt_px,
                     "pred_pixels": pred_px, "intersection": inter, "union": union})
    miou = float(np.mean([r["iou"] for r in rows])) if rows else 0.0
    return rows, miou


def image_iou(conf: np.ndarray, num_classes: int, ignore_label: int,
              mask_ignore: bool = False) -> float:
    """One image's mean IoU over the classes it has in its ground truth or prediction (the
    test-set mIoU counts an absent class as 0, which would make every single image look bad)."""
    rows, _ = iou_from_confusion(conf, num_classes, ignore_label, mask_ignore)
    present = [r["iou"] for r in rows if r["union"] > 0]
    return float(np.mean(present)) if present else 0.0


@dataclasses.dataclass(frozen=True)
class _Job:
    """One evaluation: what to read, which classes to score and how, what to write."""
    pred_dir: Path
    gt_dir: Path | str   # a store at a URL stays a string
    out_dir: Path
    num_classes: int | None
    ignore_label: int | None
    class_names: tuple
    mask_ignore: bool
    confusion: bool
    write: bool
    resize: bool
    classes_from: str
    max_image_pixels: int | None


def evaluate(pred_dir, gt_dir, *, num_classes: int | None = None,
             ignore_label: int | None = None, class_names: Sequence[str] = (),
             mask_ignore: bool = False, confusion: bool = False, out=None,
             write: bool = True, resize: bool = False, lock: bool = True,
             classes_from: str = "the call", max_image_pixels: int | None = None) -> dict:
    """The reference's mIoU of the predictions in PRED_DIR against the masks in GT_DIR.

    Predictions are ``<name>.npy`` (or label PNGs) matched by name with ``<name>.npy`` or
    grey/palette PNG masks in GT_DIR. ``num_classes``, ``ignore_label`` and ``class_names``
    default to those in PRED_DIR/predict.json when predict wrote it (ignore label 255
    otherwise). GT_DIR may also be a feature store with labels: the masks as `extract` stored
    them (at the store's size, after the rare-class rule). Predictions are at their images'
    own size (``predict``'s default), so masks of those images match them as they are.
    ``resize``: a mask of another size than its prediction is resized to it (nearest
    neighbour), only where they truly differ (e.g. a prediction made ``at_model_size``). Writes ``metrics.json`` (with ``confusion``:
    ``confusion.csv`` and ``confusion.png`` too) into ``out`` (default PRED_DIR) unless
    ``write`` is False. PRED_DIR is read under its writer lock (a predict rewriting it makes
    this fail at once); ``lock=False`` when the caller holds that lock already (``report``).
    Classes given that are not predict.json's (or a GT store's) are refused before anything is
    written, naming ``classes_from`` (e.g. "config cat_15") and the file. PNG masks of more
    than ``max_image_pixels`` pixels (default PIL's limit) are refused.
    Returns {"miou", "classes": [{index, name, iou, gt_pixels, pred_pixels, intersection,
    union}], "per_image": {name: image_iou}, ...}.
    """
    # A store at a URL stays a string: Path() would make s3://b/x.zarr the local s3:/b/x.zarr.
    pred_dir, gt_dir = Path(pred_dir), (str(gt_dir) if is_url(gt_dir) else Path(gt_dir))
    if not pred_dir.is_dir():
        raise InputNotFoundError(f"predictions folder {pred_dir} does not exist",
                                 "give the folder `ddpmseg predict` wrote")
    if not is_url(gt_dir) and not gt_dir.is_dir():
        raise InputNotFoundError(f"ground-truth folder {gt_dir} does not exist",
                                 "give the folder of test masks (<name>.npy or PNG), or a "
                                 "store with labels")
    job = _Job(pred_dir, gt_dir, Path(out) if out is not None else pred_dir, num_classes,
               ignore_label, tuple(class_names), mask_ignore, confusion, write, resize,
               classes_from, max_image_pixels)
    # The predictions are read under their folder's lock: never half a rewrite by a predict.
    with contextlib.ExitStack() as locks:
        if lock:
            locks.enter_context(writer_lock(pred_dir, "prediction folder",
                                            optional=not write))
        if write and job.out_dir.absolute() != pred_dir.absolute():
            locks.enter_context(writer_lock(job.out_dir, "metrics folder"))
        if is_store(gt_dir):  # no extract rewrites the ground-truth store meanwhile
            locks.enter_context(reader_lock(gt_dir, "store"))
        return _evaluate(job)


def _check_given_classes(given: DataConfig, classes_from: str, pred_dir: Path, meta: dict,
                         store_gt) -> None:
    """The classes to score must be those the predictions (predict.json) and a GT store were
    made with: another data set's config would score its classes on these masks."""
    hint = "give the config the predictions were made with, or no config"
    if "num_classes" in meta:
        check_classes(given, classes_from, meta["num_classes"], meta.get("ignore_label", 255),
                      meta.get("class_names"), str(pred_dir / folder.META_FILE), hint)
    if store_gt is not None:
        info = store_gt.store.info
        check_classes(given, classes_from, info.num_classes, info.ignore_label,
                      info.class_names, f"store {store_gt.path}", hint)


def _classes(job: _Job, store_gt) -> DataConfig:
    """The classes to score: the job's, else predict.json's; checked against both."""
    meta = folder.read_meta(job.pred_dir)
    num_classes = job.num_classes if job.num_classes is not None else meta.get("num_classes")
    if num_classes is None:
        raise ConfigError("the number of classes is not known",
                          "give a config or `num_classes=N`")
    ignore_label = job.ignore_label if job.ignore_label is not None \
        else meta.get("ignore_label", 255)
    num_classes, ignore_label = int(num_classes), int(ignore_label)
    if not 1 <= num_classes <= 256:
        raise ConfigError(f"num_classes must be 1..256, got {num_classes}",
                          "give `num_classes=N` with N in 1..256")
    classes = DataConfig(num_classes=num_classes, ignore_label=ignore_label,
                         class_names=render.class_names(job.class_names,
                                                        meta.get("class_names")))
    _check_given_classes(classes, job.classes_from, job.pred_dir, meta, store_gt)
    return classes


def _evaluate(job: _Job) -> dict:
    check_complete(job.pred_dir)  # a folder a killed predict left is refused, never half-scored
    store_gt = _StoreLabels(job.gt_dir) if is_store(job.gt_dir) else None
    classes = _classes(job, store_gt)
    predictions = list_predictions(job.pred_dir)
    if not predictions:
        raise InputNotFoundError(f"no predictions (<name>.npy or label PNGs) in {job.pred_dir}",
                                 "run `ddpmseg predict` first")
    # Match every prediction before reading any: a missing mask is reported up front.
    pairs = [(name, path, store_gt.find(name) if store_gt
              else find_ground_truth(job.gt_dir, name, job.max_image_pixels))
             for name, path in predictions.items()]
    conf, per_image = _accumulate(job, classes, pairs, store_gt)
    result = _result(job, classes, conf, per_image, [name for name, _, _ in pairs])
    labels = list(range(classes.num_classes))
    if classes.num_classes <= classes.ignore_label < 256:
        labels.append(classes.ignore_label)
    matrix = conf[np.ix_(labels, labels)]
    if job.confusion:
        result["confusion"] = {"labels": labels, "matrix": matrix.tolist()}
    if job.write:
        _write(job, result, matrix, labels, classes)
    return result


def _accumulate(job: _Job, classes: DataConfig, pairs: list, store_gt
                ) -> tuple[np.ndarray, dict[str, float]]:
    """The test set's confusion matrix and each image's IoU, image by image."""
    num_classes, ignore_label = classes.num_classes, classes.ignore_label
    conf = np.zeros((256, 256), dtype=np.int64)
    per_image = {}
    for name, pred_path, gt_path in pairs:
        pred = read_mask(pred_path, job.max_image_pixels)
        gt = store_gt.read(name) if store_gt else read_mask(gt_path, job.max_image_pixels)
        if pred.shape != gt.shape and job.resize:
            gt = resize_mask(gt, pred.shape)
        if pred.shape != gt.shape:
            raise BadInputError(f"prediction {pred_path} is {size_text(pred.shape)} but "
                                f"its ground truth {gt_path} is {size_text(gt.shape)}",
                                "give the folder of the masks at their images' size (a store "
                                "holds them at the model's), or predict with "
                                "`at_model_size=True`" if store_gt else
                                "pass `resize=True` to resize the masks to the predictions")
        check_labels(gt, num_classes, ignore_label, gt_path)
        check_labels(pred, num_classes, ignore_label, pred_path, what="prediction")
        image_conf = confusion_matrix(pred, gt)
        per_image[name] = image_iou(image_conf, num_classes, ignore_label, job.mask_ignore)
        conf += image_conf
    return conf, per_image


def _result(job: _Job, classes: DataConfig, conf: np.ndarray, per_image: dict,
            names: list[str]) -> dict:
    num_classes, ignore_label = classes.num_classes, classes.ignore_label
    rows, miou = iou_from_confusion(conf, num_classes, ignore_label, job.mask_ignore)
    rows = [{"index": r["index"], "name": render.class_name(classes.class_names, r["index"]),
             **{k: r[k] for k in ("iou", "gt_pixels", "pred_pixels", "intersection",
                                  "union")}} for r in rows]
    return {
        "miou": miou,
        "num_images": len(names),
        "num_classes": num_classes,
        "ignore_label": ignore_label,
        "mask_ignore": job.mask_ignore,
        "evaluated_classes": len(rows),
        "ignore_pixels": int(conf[ignore_label, :].sum()) if 0 <= ignore_label < 256 else 0,
        "total_pixels": int(conf.sum()),
        "pred_dir": str(job.pred_dir),
        "gt_dir": str(job.gt_dir),
        "resize": job.resize,
        "names": names,
        "per_image": per_image,
        "classes": rows,
    }


def _write(job: _Job, result: dict, matrix: np.ndarray, labels: list[int],
           classes: DataConfig) -> None:
    out_dir = job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / folder.METRICS_FILE, result)
    result["metrics_path"] = str(out_dir / folder.METRICS_FILE)
    if job.confusion:
        _write_confusion(out_dir, matrix, labels, classes.class_names, classes.ignore_label)
        result["confusion_csv"] = str(out_dir / folder.CONFUSION_CSV)
        result["confusion_png"] = str(out_dir / folder.CONFUSION_PNG)


def _write_confusion(out_dir: Path, matrix: np.ndarray, labels: list[int],
                     class_names: Sequence[str], ignore_label: int) -> None:
    def label(c: int) -> str:
        if c == ignore_label and c >= len(class_names):
            return f"{c}:ignore"
        return f"{c}:{render.class_name(class_names, c)}"

    write_csv(out_dir / folder.CONFUSION_CSV, [["gt \\ pred", *[label(c) for c in labels]]] + [
        [label(c), *[int(v) for v in row]] for c, row in zip(labels, matrix)])
    names = confusion_axis(labels, class_names, ignore_label)
    write_png(out_dir / folder.CONFUSION_PNG, render.confusion_image(matrix, names, names))


def confusion_axis(labels: Sequence[int], class_names: Sequence[str], ignore_label: int
                   ) -> list[str]:
    """The confusion picture's axis labels: "<index> <name>", "<index> ignore" for the
    ignore label when it is no class."""
    return [f"{c} ignore" if c == ignore_label and c >= len(class_names)
            else render.class_label(c, class_names) for c in labels]


def format_table(result: dict) -> str:
    """The per-class table as aligned text, then the mIoU line."""
    rows = result["classes"]
    name_w = min(40, max([5] + [len(r["name"]) for r in rows]))
    num_w = max([8] + [len(str(r["union"])) for r in rows]) + 1
    header = (f"{'idx':>4}  {'class':<{name_w}}  {'IoU %':>7}  {'gt px':>{num_w}}  "
              f"{'pred px':>{num_w}}  {'inter':>{num_w}}  {'union':>{num_w}}")
    lines = [header, "-" * len(header)]
    for r in rows:
        name = r["name"] if len(r["name"]) <= name_w else r["name"][:name_w - 2] + ".."
        lines.append(f"{r['index']:>4}  {name:<{name_w}}  {100 * r['iou']:>7.2f}  "
                     f"{r['gt_pixels']:>{num_w}}  {r['pred_pixels']:>{num_w}}  "
                     f"{r['intersection']:>{num_w}}  {r['union']:>{num_w}}")
    lines.append("-" * len(header))
    mode = "masked out" if result.get("mask_ignore") else "not masked (reference)"
    lines.append(f"mIoU {100 * result['miou']:.2f} % over {len(rows)} classes, "
                 f"{result.get('num_images', '?')} images (ignore label "
                 f"{result.get('ignore_label')}: {mode})")
    return "\n".join(lines)

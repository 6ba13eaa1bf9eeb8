"""``ddpmseg suggest``: which images to label next.

Each image of a store or a folder is predicted by the run's ensemble; its score is the mean
over pixels of the members' disagreement: the Jensen-Shannon divergence of their softmax
outputs (``by="jsd"``, what the members disagree on) or the entropy of their mean (``by=
"entropy"``, what the ensemble as a whole is unsure of). Images are ranked by score, highest
first. Images that are labelled already are left out (``include_labelled`` ranks them too):
those with a mask that labels a pixel (an image folder's mask file, a store extracted with
labels; a mask of only the ignore label labels nothing) and those the
run was trained on (the same image bytes, by the sha256 the run's store recorded). With ``diverse``, the ranking is greedy: each next image maximises its score (scaled by
the highest) minus ``penalty`` x its largest cosine similarity to an image already chosen,
measured on the images' mean-pooled features (each stored map averaged over its pixels,
centred on the mean over the images, so that what every image shares does not count), so
near-duplicates of a chosen image fall back.

Writes ``suggest.csv`` (rank, name, score, per-class predicted area as a fraction of the
image) and ``suggest.png`` (a contact sheet of the top images: image, prediction, overlay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddpmseg.classifier.run import read_header
from ddpmseg.core.cluster import check_scheduler
from ddpmseg.core.device import resolve_device, use_threads
from ddpmseg.core.errors import ConfigError
from ddpmseg.core.fileio import write_png
from ddpmseg.core.locking import writer_lock
from ddpmseg.outputs import render
from ddpmseg.outputs.suggestions import CSV_FILE, SCORES, SHEET_FILE, write_suggestions
from ddpmseg.pipelines import spread
from ddpmseg.pipelines.predict import (
    Opening,
    input_path,
    load_run,
    only,
    open_source,
    predict_maps,
    reading_source,
)

log = logging.getLogger(__name__)

SHEET_IMAGES = 8        # rows of the contact sheet
DIVERSITY_PENALTY = 1.0


@dataclass
class Scored:
    name: str
    score: float
    area: np.ndarray            # (C,) fraction of pixels predicted as each class
    # mean-pooled features, for --diverse only. No image or label map is kept per image: a
    # pool of 100k images would hold them all; the sheet predicts its few rows again.
    pooled: np.ndarray | None = field(repr=False, default=None)
    similarity: float | None = None   # with diverse: largest cosine similarity to a pick before


class Ranking(list):
    """The ranked ``Scored`` images, best first; ``skipped``: {name: why} of the labelled
    images left out."""

    def __init__(self, ranked=(), skipped: dict[str, str] | None = None):
        super().__init__(ranked)
        self.skipped = dict(skipped or {})


WITH_MASK = "with a mask"
TRAINED_ON = "trained on by the run"


def labelled_images(source, model) -> dict[str, str]:
    """{name: why} of the images of ``source`` (``predict.open_source``) that are labelled
    already: with a mask, or trained on by ``model`` (its run's recorded image set)."""
    trained = set()
    if model.run_dir is not None:
        images = read_header(model.run_dir).images or {}
        trained = {h[0] for h in images.values() if h and h[0]}
    out = {}
    for name, (sha, has_mask) in source.image_content().items():
        if has_mask:
            out[name] = WITH_MASK
        elif sha is not None and sha in trained:
            out[name] = TRAINED_ON
    return out


def skipped_line(skipped: dict[str, str]) -> str:
    """One line saying how many labelled images were left out, and why."""
    if not skipped:
        return "skipped 0 labelled images"
    why = [f"{sum(1 for v in skipped.values() if v == w)} {w}" for w in (WITH_MASK, TRAINED_ON)]
    return (f"skipped {len(skipped)} labelled image(s) ("
            + ", ".join(w for w in why if not w.startswith("0 "))
            + "); `include_labelled=True` ranks them too")


def pooled_features(maps) -> np.ndarray:
    """One vector per image: every native map averaged over its pixels, concatenated."""
    return np.concatenate([np.asarray(m, dtype=np.float32).reshape(m.shape[0], -1).mean(1)
                           for m in maps])


def diverse_order(scores: np.ndarray, pooled: np.ndarray,
                  penalty: float = DIVERSITY_PENALTY) -> tuple[list[int], list[float | None]]:
    """Greedy selection: indices in pick order and each pick's largest cosine similarity to
    the picks before it (None for the first)."""
    x = pooled - pooled.mean(0, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)
    top = float(scores.max()) if scores.size and scores.max() > 0 else 1.0
    value = scores / top
    chosen, sims = [], []
    nearest = np.full(len(scores), -np.inf)
    left = set(range(len(scores)))
    while left:
        cand = sorted(left)
        gain = [value[i] - penalty * max(nearest[i], 0.0) if chosen else value[i] for i in cand]
        i = cand[int(np.argmax(gain))]
        sims.append(float(nearest[i]) if chosen else None)
        chosen.append(i)
        left.remove(i)
        nearest = np.maximum(nearest, x @ x[i])
    return chosen, sims


def suggest(run, input, out_dir, *, top: int | None = None, by: str = "jsd",
            diverse: bool = False, device="auto", checkpoint: str | None = None,
            resize: bool = False, images: str | None = None, tile_rows: int | None = None,
            include_labelled: bool = False, threads: int | None = None,
            max_image_pixels: int | None = None, scheduler: str | None = None) -> Ranking:
    """Rank the unlabelled images of ``input`` (a store or an image folder) for labelling by
    the run's ensemble disagreement; write suggest.csv and suggest.png into ``out_dir``.
    Returns the top ``top`` (default all) in rank order, with ``.skipped`` the labelled images
    left out (none with ``include_labelled``). Torch runs on ``threads`` threads (default:
    torch's), restored after; images of more than ``max_image_pixels`` pixels (default PIL's
    limit) are refused. ``scheduler`` ("local", "local:N" or a dask scheduler address whose
    workers see the same files) scores the images as dask tasks, with the same outputs."""
    check_scheduler(scheduler)  # before anything is written
    if by not in SCORES:
        raise ConfigError(f"unknown score {by!r}", f"use one of {', '.join(SCORES)}")
    if top is not None and top < 1:
        raise ConfigError(f"top must be at least 1, got {top}", "give `top=1` or more")
    with use_threads(threads):
        dev = resolve_device(device)
        model = load_run(run, dev)
        if len(model.members) < 2 and by == "jsd":
            raise ConfigError("the run has one member: members cannot disagree",
                              "give `by=entropy`, or fit an ensemble of 2 or more")
        path = input_path(input)
        with reading_source(path):
            source = open_source(path, model, dev, checkpoint, resize,
                                 Path(images) if images else None, max_image_pixels)
            skipped = {} if include_labelled else labelled_images(source, model)
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            with writer_lock(out, "suggestions folder"):
                opening = (Opening.of(model, source, path, dev, resize,
                                      Path(images) if images else None, max_image_pixels)
                           if scheduler else None)
                job = _Job(model, source, input, out, skipped, top, by, diverse, dev,
                           int(tile_rows or model.config.predict.tile_rows), opening,
                           scheduler)
                return _rank(job)


@dataclass(frozen=True)
class _Job:
    """One ranking: the run, the images, what to rank by and where it goes."""
    model: object            # the run's Ensemble
    source: object           # predict.open_source's
    input: object            # as given, for the log
    out: Path
    skipped: dict            # {name: why} of the labelled images left out
    top: int | None
    by: str
    diverse: bool
    device: object
    tile_rows: int
    opening: Opening | None = None   # what dask workers open (with a scheduler)
    scheduler: str | None = None


def _predictions(model, source, items, tile_rows: int, device):
    """(item, its prediction with uncertainty at the model's size), item by item."""
    for item in items:
        yield item, predict_maps(model.members, item.maps, source.size, vote="soft",
                                 tile_rows=tile_rows, uncertainty=True, device=device)


def _score_items(model, source, items, by: str, tile_rows: int, device,
                 diverse: bool) -> list[Scored]:
    """Each item predicted and scored."""
    scored = []
    for item, pred in _predictions(model, source, items, tile_rows, device):
        per_pixel = pred.jsd if by == "jsd" else pred.entropy
        area = np.bincount(pred.labels.ravel(), minlength=256)[:model.num_classes]
        scored.append(Scored(item.name, float(per_pixel.mean()), area / pred.labels.size,
                             pooled_features(item.maps) if diverse else None))
        item.maps = None
    return scored


def _score_chunk(setup: tuple, names: list[str]) -> list[Scored]:
    """A dask task: ``_score_items`` of ``names``; setup: (Opening, by, tile_rows, diverse)."""
    opening, by, tile_rows, diverse = setup
    model, source = opening.open()
    return _score_items(model, source, only(source, names), by, tile_rows,
                        resolve_device(opening.device), diverse)


def _score(job: _Job) -> list[Scored]:
    """Every image not skipped, predicted and scored (in this process, or on dask)."""
    if not job.scheduler:
        return _score_items(job.model, job.source, job.source.items(skip=job.skipped), job.by,
                            job.tile_rows, job.device, job.diverse)
    names = [n for n in job.source.names if n not in job.skipped]
    return list(spread.in_order(job.scheduler, _score_chunk,
                                (job.opening, job.by, job.tile_rows, job.diverse), names,
                                name="suggest", doing=f"ranking the images of {job.input}"))


def _rank(job: _Job) -> Ranking:
    model, out, by, diverse = job.model, job.out, job.by, job.diverse
    scored = _score(job)
    if not scored:
        # No stale suggestions of an earlier run stay behind (a report would list them).
        _write_csv(out / CSV_FILE, [], by, diverse, model)
        (out / SHEET_FILE).unlink(missing_ok=True)
        if job.skipped:
            log.info("nothing to rank in %s: all %d image(s) are labelled", job.input,
                     len(job.skipped))
        return Ranking([], job.skipped)
    scores = np.array([s.score for s in scored])
    if diverse:
        order, sims = diverse_order(scores, np.stack([s.pooled for s in scored]))
        for i, sim in zip(order, sims):
            scored[i].similarity = sim
    else:
        order = sorted(range(len(scored)), key=lambda i: (-scores[i], scored[i].name))
    ranked = [scored[i] for i in order][:job.top]
    _write_csv(out / CSV_FILE, ranked, by, diverse, model)
    _write_sheet(out / SHEET_FILE, ranked[:SHEET_IMAGES], job)
    log.info("ranked %d image(s) by %s%s; wrote %s and %s", len(scored), by,
             " (diverse)" if diverse else "", out / CSV_FILE, out / SHEET_FILE)
    return Ranking(ranked, job.skipped)


def _class_names(model) -> tuple[str, ...]:
    """The run's class names (recorded, else its config's), as suggest shows them."""
    return render.class_names(model.info.class_names, model.config.data.class_names)


def _write_csv(path: Path, ranked: list[Scored], by: str, diverse: bool, model) -> None:
    rows = [(s.name, s.score, s.similarity, s.area) for s in ranked]
    names = _class_names(model)
    write_suggestions(path, rows, by, [render.class_name(names, k)
                                       for k in range(model.num_classes)], diverse)


def _write_sheet(path: Path, ranked: list[Scored], job: _Job) -> None:
    """The contact sheet of the top images: predicted again here (the same labels as when
    they were scored), since no image or label map was kept while ranking."""
    model = job.model
    palette = render.make_palette(model.num_classes, model.info.ignore_label)
    names = _class_names(model)
    shown = {item.name: (item.image, pred.labels) for item, pred in _predictions(
        model, job.source, only(job.source, [s.name for s in ranked]), job.tile_rows,
        job.device)}
    rows = [(f"{k}. {s.name}  ({job.by} {s.score:.4f})", *shown[s.name])
            for k, s in enumerate(ranked, 1)]
    write_png(path, render.contact_sheet(rows, palette, names, model.num_classes))


__all__ = ["suggest", "diverse_order", "pooled_features", "SCORES",
           "Ranking", "labelled_images"]

"""``extract``: a folder of images (and masks) -> a feature store.

The pipeline, in one process: a loader thread decodes the next batch of images while the model
runs the current one; each finished image's activations go to a small thread pool that casts
them to the store dtype, checks float16 overflow, compresses and writes them, and flags the
image complete last. With ``scheduler`` the images are split into dask.distributed tasks; each
worker process loads the backbone once and writes only its own images' chunks.

Everything the user can get wrong (a mask with unknown labels or of the wrong size, an image of
the wrong size, a store made with another model) is reported before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import logging
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpmseg import data
from ddpmseg.backbone import Backbone, describe_backbone, load_backbone
from ddpmseg.backbone.base import image_tensor
from ddpmseg.backbone.adm.flags import USUAL_FEATURES
from ddpmseg.backbone.bundled import BUNDLED_CHECKPOINTS, BUNDLED_PRESETS, resolve_checkpoint
from ddpmseg.config import Config, FeatureConfig, ModelConfig
from ddpmseg.core import objectstore
from ddpmseg.core.cluster import (
    Opened,
    absolute,
    check_scheduler,
    opened,
    run_tasks,
    worker_must_see,
    workers_for,
)
from ddpmseg.core.device import use_threads
from ddpmseg.core.errors import (
    BadInputError,
    ConfigError,
    StaleWriterError,
    StoreAccessError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.core.fileio import is_no_space, is_url, no_space_error
from ddpmseg.core.locking import writer_lock
from ddpmseg.core.progress import bar
from ddpmseg.core.renames import renamed_keyword
from ddpmseg.featcache import content, integrity
from ddpmseg.featcache.store import (
    DEFAULT_IMAGES_PER_SHARD,
    FORMAT_VERSION,
    FeatureStore,
    StoreInfo,
    encode_image,
    is_store,
    parse_codec,
)
from ddpmseg.spec import (
    PRECISIONS,
    STORE_DTYPES,
    TOLERATED,
    VALUE_BYTES,
    BackboneId,
    FeatureSpec,
    check_steps,
    short,
)

log = logging.getLogger(__name__)

# Threads that cast, compress and write finished images while the model runs.
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class _Inputs:
    samples: list            # data.Sample, sorted by name (tiles: one per window)
    labels: list             # per image: uint8 (H, W) after the rare-class rule, or None,
    has_labels: bool         # or LATER: a mask unchanged since it was checked (``label``)
    later: Callable | None = None   # sample -> its labels, checked as _read_inputs does
    stat_cache: object = None       # content.StatCache of the store: what was unchanged
    sizes: dict = dataclasses.field(default_factory=dict)    # {name: [H, W, mode or None]}
    windows: dict = dataclasses.field(default_factory=dict)  # tiles: {name: window index}
    kept: tuple = ()         # names of unchanged images, not read: their recorded size stands

    def label(self, k: int):
        """Image k's labels, loaded now if they were left for later."""
        lab = self.labels[k]
        return self.later(self.samples[k]) if lab is LATER else lab


# An unchanged image's mask (content.StatCache): checked when it was first extracted, loaded
# only if its image is to be extracted again.
LATER = object()


@dataclass(frozen=True)
class _Job:
    """What an extraction task needs besides the backbone (picklable, for dask). Tasks run
    with the client's torch thread count (``core.cluster.run_tasks``): then a worker's
    features are bit-identical to a one-process run."""

    store_path: str
    image_paths: tuple[str, ...]
    spec: FeatureSpec
    batch_size: int
    resize: bool | str
    # The store's writer token of this attempt: a task stops when the store has another.
    writer: int = 0
    max_image_pixels: int | None = None   # None: PIL's limit
    windows: tuple = ()   # tiles: per store index, its window of its image (None: whole)


@dataclass(frozen=True)
class _Request:
    """An extraction's settings, resolved and checked (before anything is read or written)."""

    data_dir: Path
    store_path: str
    config: Config
    checkpoint: Path | None      # resolved (a bundled name: the package's file)
    recorded: str | None         # a bundled checkpoint's name, recorded as given
    batch_size: int
    precision: str
    codec: dict
    device: object = "auto"
    overwrite: bool = False
    resize: bool | str = False
    scheduler: str | None = None
    progress: bool = True
    prune: bool = False
    compact: bool = False
    repair: bool = False
    max_image_pixels: int | None = None
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD

    @property
    def resolved_config(self) -> Config:
        """The config recorded in the store: checkpoint, precision and batch size as used."""
        checkpoint = self.recorded or (str(self.checkpoint) if self.checkpoint else "")
        return self.config.replace(
            model={"checkpoint": checkpoint},
            features={"precision": self.precision, "images_per_batch": self.batch_size})


def extract(data_dir, store_path, config: Config | None = None, checkpoint=None, *,
            preset: str | None = None, backbone=None, device="auto",
            images_per_batch: int | None = None,
            precision: str | None = None, overwrite: bool = False, resize: bool | str = False,
            scheduler: str | None = None, progress: bool = True, prune: bool = False,
            compact: bool = False, repair: bool = False,
            threads: int | None = None, max_image_pixels: int | None = None,
            batch_size: int | None = None,
            images_per_shard: int = DEFAULT_IMAGES_PER_SHARD) -> FeatureStore:
    """Extract the features of every image of ``data_dir`` into the store at ``store_path``.

    ``config``: steps, blocks, seed and dtype from ``config.features``; classes, ignore label
    and the rare-class rule from ``config.data``; model flags from ``config.model.preset`` and
    the checkpoint from ``checkpoint`` or ``config.model.checkpoint``; ``preset`` (a preset
    name or flags JSON) stands for ``config.model.preset``. A bundled checkpoint
    (``checkpoint="bundled:faces_64"``) brings its preset and the model's usual steps and
    blocks, as on the command line (``resolve_model``). ``backbone``: an
    already-loaded ``ddpmseg.backbone.Backbone`` (then no checkpoint is needed, except with a
    scheduler, whose workers load their own).

    ``data_dir`` holds images with masks of the same stem (a training or evaluation store) or
    images only (a prediction-only store, ``has_labels`` False). Some images with masks and
    some without is an error naming an image without one: a forgotten mask would otherwise
    silently become an unlabelled image.

    Rerunning with the same arguments resumes: complete images are kept, the rest are redone,
    and the result is bit-identical to an uninterrupted run. A store made with another model,
    steps, blocks, seed, dtype or classes is refused (``StoreMismatchError``) unless
    ``overwrite``. A store follows its folder (``featcache.content``): new images are
    appended, a changed mask rewrites its labels, a changed image is re-extracted; images
    that left the folder are refused unless ``prune`` (kept, inactive) or ``compact``
    (rewritten without them). ``repair`` reads every chunk of every complete image first and
    re-extracts exactly the damaged ones (``ddpmseg verify`` lists them). The store is locked
    against a second writer for the whole run (``ddpmseg.core.locking``). ``scheduler``: None
    (this process), "local" / "local:N" (a dask
    LocalCluster of N single-threaded worker processes) or "tcp://host:port" (a running dask
    scheduler whose workers see the same files). ``threads``: torch's CPU threads for the
    run (default: OMP_NUM_THREADS, else torch's); the caller's setting is restored after.
    ``max_image_pixels``: images (and PNG masks) of more pixels are refused from their header
    (default: PIL's limit). ``batch_size`` is the old spelling of ``images_per_batch``.
    ``images_per_shard``: a new store (format 4) keeps that many images' chunks of an array in
    one file; 0 makes a format-2 store (one file per image per array). An existing store keeps
    its own layout.
    ``resize`` fits images of another size than the model's: True (the default way,
    ``spec.DEFAULT_RESIZE``), "stretch", "pad" (letterboxed; the border's labels are the
    ignore label) or "tiles" (each overlapping model-size window of the image at its own
    resolution is a store image ``<name>@<y>_<x>`` with its mask's window). Each image's own
    size and mode are recorded (``featcache.content``), for predictions at that size.
    Returns the store, opened for reading.
    """
    config = resolve_model(config or Config(), checkpoint, preset=preset, backbone=backbone)
    fc = config.features
    precision = precision or fc.precision
    batch_size = int(renamed_keyword("extract", "batch_size", batch_size, "images_per_batch",
                                     images_per_batch) or fc.images_per_batch)
    _check_settings(fc, precision, batch_size, config.data)  # steps and blocks: the Config checked
    if int(images_per_shard) < 0:
        raise ConfigError(f"images per shard must be at least 0, got {images_per_shard}",
                          "pass `images_per_shard=N` (N >= 1; 0 makes a format-2 store)")
    check_scheduler(scheduler)  # before anything is written
    if is_url(store_path):  # credentials, endpoint, bucket: before the backbone loads
        objectstore.check_access(str(store_path))
    data.resize_mode(resize)
    checkpoint = config.model.checkpoint or None
    request = _Request(
        Path(data_dir), str(store_path), config,
        checkpoint=resolve_checkpoint(checkpoint) if checkpoint else None,
        # A bundled name is recorded as given: the package's own path differs per install.
        recorded=str(checkpoint) if str(checkpoint) in BUNDLED_CHECKPOINTS else None,
        batch_size=batch_size, precision=precision, codec=parse_codec(fc.codec, fc.dtype),
        device=device, overwrite=overwrite, resize=resize, scheduler=scheduler,
        progress=progress, prune=prune, compact=compact, repair=repair,
        max_image_pixels=max_image_pixels, images_per_shard=int(images_per_shard))
    with use_threads(threads, "extract"):
        info, inputs, backbone = _prepare(request, backbone)
        # Under the store's writer lock: create the store, or reopen it and check that it was
        # made the same way; make it follow the folder; then extract what is left.
        with writer_lock(store_path, "store"):
            _extract_locked(request, info, inputs, backbone)
    return FeatureStore.open(store_path)


def resolve_model(config: Config, checkpoint=None, *, preset: str | None = None,
                  backbone=None) -> Config:
    """The config with the backbone the call names, and that model's usual features.

    ``checkpoint`` (else ``config.model.checkpoint``) becomes ``model.checkpoint``, and
    ``preset`` (else ``config.model.preset``) ``model.preset``. A bundled checkpoint
    (``bundled:faces_64``) brings its preset when no ``preset`` is given and the config leaves
    it at its default; a preset with a bundled checkpoint and no checkpoint given brings that
    one, with a note. A model whose usual steps and blocks (``USUAL_FEATURES``) differ from the
    defaults gets them where the config leaves ``features.steps`` / ``features.blocks`` at the
    defaults (the 256 px models', whose blocks a small model does not have); steps and blocks
    the config sets are kept. The CLI passes its options through here too, so
    ``extract(..., checkpoint="bundled:faces_64")`` and ``ddpmseg extract --checkpoint
    bundled:faces_64`` make the same store. With an already-loaded ``backbone`` only the
    checkpoint is recorded: the model is the one given.
    """
    checkpoint = str(checkpoint) if checkpoint not in (None, "") else config.model.checkpoint
    if backbone is not None:
        return config.replace(model={"checkpoint": checkpoint, "preset": preset})
    given = preset is not None
    preset = preset if given else config.model.preset
    if checkpoint in BUNDLED_PRESETS and not given and preset == ModelConfig.preset:
        preset = BUNDLED_PRESETS[checkpoint]
    if not checkpoint:
        checkpoint = next((name for name, p in BUNDLED_PRESETS.items() if p == preset), "")
        if checkpoint:
            log.warning("note: no `checkpoint=PATH` given; using the one bundled with "
                        "preset %s (%s)", preset, checkpoint)
    usual = USUAL_FEATURES.get(preset, {})
    features = {key: usual[key] for key in ("steps", "blocks")
                if key in usual and getattr(config.features, key) == getattr(FeatureConfig, key)}
    return config.replace(model={"preset": preset, "checkpoint": checkpoint},
                          features=features)


def _prepare(request: _Request, backbone) -> tuple[StoreInfo, _Inputs, object]:
    """Every mask and image size checked (nothing written yet), the backbone loaded, and the
    store's info: (info, inputs, backbone)."""
    config = request.config
    fc, dc = config.features, config.data
    flags = describe_backbone(backbone or request.checkpoint, config.model.preset)
    check_steps(fc.steps, flags.diffusion_steps, where="[features]")
    size = (flags.image_size, flags.image_size)
    # Files unchanged since an earlier run hashed them were checked then: not read again.
    # (Only into an existing store kept as it is: a new or replaced store checks every file
    # before its first byte is written.)
    stat_cache = content.StatCache.load(request.store_path)
    keep = is_store(request.store_path) and not request.overwrite
    inputs = _read_inputs(request.data_dir, size, request.resize, dc, request.max_image_pixels,
                          stat_cache.unchanged if keep else None)
    inputs = dataclasses.replace(inputs, stat_cache=stat_cache)
    if backbone is None:
        if request.checkpoint is None:
            raise ConfigError("no checkpoint given",
                              "pass `checkpoint=PATH` or set model.checkpoint in the config")
        # The preset by name, when the config names one: a checkpoint of another preset is
        # then told which preset loads it, in one line, instead of its unfitting keys.
        backbone = load_backbone(request.checkpoint, config.model.preset or flags,
                                 device=request.device, prompt=config.model.prompt)
    spec = FeatureSpec.of_backbone(backbone, fc.steps, fc.blocks, size, seed=int(fc.seed),
                                   dtype=fc.dtype, precision=request.precision)
    info = StoreInfo(spec=spec, num_images=len(inputs.samples),
                     names=tuple(s.name for s in inputs.samples),
                     num_classes=dc.num_classes, ignore_label=dc.ignore_label,
                     class_names=tuple(dc.class_names), has_labels=inputs.has_labels,
                     min_class_pixels=dc.min_class_pixels, codec=request.codec,
                     images_per_shard=request.images_per_shard,
                     format_version=FORMAT_VERSION if request.images_per_shard else 2)
    return info, inputs, backbone


def _extract_locked(request: _Request, info: StoreInfo, inputs: _Inputs, backbone) -> None:
    """The store made or reopened, following its folder (appended, relabelled, re-extracted,
    pruned images), then the images still to do extracted: under the writer lock."""
    store = _open_or_create(request.store_path, info, request.overwrite,
                            request.resolved_config.to_dict())
    # Stat before hash: only files whose stat changed since they were hashed are read.
    stat_cache = inputs.stat_cache or content.StatCache.load(store.path)
    folder_hashes = content.sample_hashes(inputs.samples, stat_cache)
    changes = content.plan(store, folder_hashes, request.prune or request.compact)
    index = {s.name: k for k, s in enumerate(inputs.samples)}
    # The masks to relabel with (changed since the store recorded them; loaded now if their
    # files were left for later, as when the store was made from another copy of the folder).
    labels_by_name = {name: inputs.label(index[name])
                      for name in (store.names[i] for i in changes.relabel)}
    if request.repair or changes.describe() or not store.complete().all():
        # Tasks of earlier attempts stop at their next image. (A complete store that stays
        # as it is keeps its token: a rerun writes nothing, and no task of an earlier attempt
        # can still be at work, since each image it had is complete.)
        store.begin_attempt()
    _check_recorded_sizes(store, inputs, data.resize_mode(request.resize))
    content.apply(store, changes, labels_by_name, inputs.sizes)
    stat_cache.save()
    if request.compact:
        store = content.compact(store)
    paths_by_name = {s.name: str(s.image) for s in inputs.samples}
    todo, done = _images_to_do(store, request.repair, paths_by_name)
    if not todo:
        return
    # Absolute paths: a tcp:// scheduler's workers run in folders of their own.
    job = _Job(absolute(request.store_path),
               tuple(absolute(paths_by_name[n]) if n in paths_by_name else ""
                     for n in store.info.names),
               info.spec, request.batch_size, data.resize_mode(request.resize) or False,
               store.writer, request.max_image_pixels,
               tuple(inputs.windows.get(n) for n in store.info.names) if inputs.windows else ())
    wanted = set(todo)
    labels = [inputs.label(index[name]) if i in wanted else None
              for i, name in enumerate(store.info.names)]
    start = time.perf_counter()
    _run(request, store, job, todo, labels, backbone, initial=len(done) - len(todo))
    _refuse_foreign(store)
    log.info("extracted %d image%s in %.1fs into %s (%d dims per pixel, %s)", len(todo),
             "" if len(todo) == 1 else "s",
             time.perf_counter() - start, request.store_path, store.info.feature_dim,
             store.info.dtype)


def _run(request: _Request, store: FeatureStore, job: _Job, todo: list[int], labels: list,
         backbone, initial: int) -> None:
    """Extract ``todo`` in this process or as dask tasks, with a progress bar; a disk that
    fills up is one error saying how much more the rest needs."""
    try:
        with bar(total=initial + len(todo), initial=initial, desc="extract", unit="img",
                 progress=request.progress) as images:
            if request.scheduler:
                _run_distributed(request, store.info, job, todo, labels, backbone,
                                 images.update)
            else:
                run_images(store, backbone, job, todo, labels,
                           on_done=lambda i: images.update(1))
    except OSError as exc:
        if not is_no_space(exc):
            raise
        left = int((~store.complete()).sum())
        raise no_space_error(request.store_path, left * _image_bytes(store.info), "the store",
                             f"{left} image(s)") from exc


def _images_to_do(store: FeatureStore, repair: bool,
                  paths_by_name: dict) -> tuple[list[int], np.ndarray]:
    """(indices to extract, complete flags): the incomplete images, those flagged complete
    with a chunk missing, and with ``repair`` those whose chunks are damaged. Pruned images
    are not in the folder: one left unfinished stays so (never trained on)."""
    info = store.info
    foreign = store.foreign_images(accepted=(store.previous_writer,))
    if foreign:
        log.warning("%s: %d image(s) were written by a task of an earlier extract after "
                    "another attempt took the store over: redoing them (%s)", store.path,
                    len(foreign), short([info.names[i] for i in foreign]))
        for i in foreign:
            store.mark_incomplete(i)
    done = store.complete()
    store.restamp(done)  # from now on, the complete images are this attempt's
    missing = {} if repair else store.missing_by_image(np.flatnonzero(done))
    for i in np.flatnonzero(done):
        if repair:
            problems = [f"{name}: {what}" for name, what in store.damage(int(i))]
        else:
            problems = [f"{name} is missing" for name in missing[int(i)]]
        if problems:
            log.warning("image %d (%s) is damaged (%s): redoing it", i, info.names[i],
                        "; ".join(problems[:2]) + ("; ..." if len(problems) > 2 else ""))
            store.mark_incomplete(int(i))
            done[i] = False
    todo = [int(i) for i in np.flatnonzero(~done) if info.names[i] in paths_by_name]
    if len(todo) < len(done):
        log.info("%s: %d of %d images already extracted, %d to go", store.path,
                 len(done) - len(todo), len(done), len(todo))
    return todo, done


def _refuse_foreign(store: FeatureStore) -> None:
    """After the run: images that a task of an earlier attempt wrote while this one ran (it
    checked the token just before this attempt changed it) are flagged incomplete, and the
    run fails naming them; a rerun redoes them."""
    foreign = store.foreign_images()
    if not foreign:
        return
    for i in foreign:
        store.mark_incomplete(i)
    names = [store.info.names[i] for i in foreign]
    raise StaleWriterError(
        f"{store.path}: {len(foreign)} image(s) were overwritten by a task of an earlier, "
        f"interrupted extract while this one ran: {short(names)}",
        "they are flagged incomplete; rerun the same command to redo them")


def _image_bytes(info: StoreInfo) -> int:
    """Upper bound of one image's bytes in the store (uncompressed maps and labels)."""
    maps = sum(c * h * w for c, h, w in info.shapes) * VALUE_BYTES[info.dtype]
    return maps + info.image_size[0] * info.image_size[1] + 64


# -- checking inputs ----------------------------------------------------------------------------

def _check_settings(fc, precision: str, batch_size: int, dc) -> None:
    """The config's feature and data settings (``fc``, ``dc``), the compute precision and the
    batch size, refused in one line each before anything is read."""
    if fc.dtype not in STORE_DTYPES:
        raise ConfigError(f"unknown store dtype {fc.dtype!r}",
                          f"use one of {', '.join(STORE_DTYPES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ConfigError(f"images per batch must be at least 1, got {batch_size}")
    if not 1 <= dc.num_classes <= 256:
        raise ConfigError(f"data.num_classes must be 1..256, got {dc.num_classes}")
    if not 0 <= dc.ignore_label <= 255:
        raise ConfigError(f"data.ignore_label must be 0..255, got {dc.ignore_label}")


def _read_inputs(data_dir, size: tuple[int, int], resize: bool, dc,
                 max_pixels: int | None = None, unchanged: Callable | None = None) -> _Inputs:
    """The folder's samples with their labels, every image size and mask checked; with
    ``unchanged`` (path -> bool), an image and mask unchanged since an earlier run checked
    them are not read (their labels are LATER)."""
    samples = data.list_samples(data_dir, max_image_pixels=max_pixels)
    with_mask = [s for s in samples if s.mask is not None]
    if with_mask and len(with_mask) < len(samples):
        lone = next(s for s in samples if s.mask is None)
        raise BadInputError(
            f"image {lone.image} has no mask ({data.ACCEPTED_MASKS}) while "
            f"{len(with_mask)} of the {len(samples)} images in {data_dir} have one",
            "add its mask, or move it to a folder of unlabelled images (a folder without any "
            "mask makes a prediction-only store)")
    labels, unlabelled, fitted = [], [], _Fitted()

    def checked(s):
        return _fitted_labels(s, size, resize, dc, max_pixels, unlabelled)[1][0]

    # Tiles: the windows' names come from the image's size, so every image is read.
    skip = unchanged if data.resize_mode(resize) != "tiles" else None
    for s in samples:
        if skip is not None and skip(s.image) and (s.mask is None or skip(s.mask)):
            fitted.keep(s)
            labels.append(None if s.mask is None else LATER)
            continue
        lay, masks = _fitted_labels(s, size, resize, dc, max_pixels, unlabelled)
        fitted.add(s, lay)
        labels += masks
    if unlabelled:  # fit trains on none of their pixels: say so rather than count them
        log.warning("note: %d mask(s) in %s hold only the ignore label %d, so their images are "
                    "unlabelled (no pixel to train on or score): %s", len(unlabelled), data_dir,
                    dc.ignore_label, ", ".join(unlabelled[:5])
                    + (", ..." if len(unlabelled) > 5 else ""))
    return _Inputs(fitted.samples, labels, bool(with_mask), checked, sizes=fitted.sizes,
                   windows=fitted.windows, kept=tuple(fitted.kept))


def _fitted_labels(s, size: tuple[int, int], resize, dc, max_pixels: int | None,
                   unlabelled: list) -> tuple:
    """A sample's image size checked: its ``data.Layout``, and its mask's labels per model
    input (None each without a mask), checked and after the rare-class rule; a mask holding
    only the ignore label goes to ``unlabelled``."""
    hw = data.image_hw(s.image, max_pixels)
    data.check_image_size(s.image, hw, size, resize)
    lay = data.layout(hw, size, resize)
    if s.mask is None:
        return lay, [None] * len(lay.windows())
    # The mask must match its own image (`resize` fits both to the model's size).
    mask = data.load_mask(s.mask, hw, hint="make the mask the size of its image",
                          max_image_pixels=max_pixels)
    data.check_labels(mask, dc.num_classes, dc.ignore_label, s.mask)
    if not data.labelled(mask, dc.ignore_label):
        unlabelled.append(s.mask.name)
    # data's nearest-neighbour fit (labels stay labels; padding is the ignore label).
    return lay, [data.drop_rare_classes(m, dc.num_classes, dc.ignore_label, dc.min_class_pixels)
                 for m in data.fit_mask(mask, lay, dc.ignore_label)]


class _Fitted:
    """The store images of a folder's samples: one per image, or one per tile
    (``<name>@<y>_<x>``), and the sizes to record."""

    def __init__(self):
        self.samples, self.sizes, self.windows, self.kept = [], {}, {}, []

    def keep(self, s: data.Sample) -> None:
        """An unchanged image, not read: the store's record of it stands."""
        self.samples.append(s)
        self.kept.append(s.name)

    def add(self, s: data.Sample, lay: data.Layout) -> data.Layout:
        if lay.mode != "tiles":
            self.samples.append(s)
            self.sizes[s.name] = [lay.hw[0], lay.hw[1], None if lay.mode == "same" else lay.mode]
            return lay
        for k, (y, x) in enumerate(lay.windows()):
            name = f"{s.name}@{y}_{x}"
            self.samples.append(data.Sample(name, s.image, s.mask))
            self.windows[name] = k
        return lay


def _check_recorded_sizes(store: FeatureStore, inputs: _Inputs, mode: str | None) -> None:
    """A store keeps one way of fitting each image: another one is refused (its maps and
    labels would mix two geometries). Unchanged images (``inputs.kept``, not read) are held
    to the mode asked for."""
    recorded = content.read_state(store).sizes
    # (Another size is another image: re-extracted, whichever way it is fitted now.)
    other = [n for n, rec in inputs.sizes.items() if n in recorded
             and list(recorded[n][:2]) == list(rec[:2]) and recorded[n][2] != rec[2]]
    other += [n for n in inputs.kept if n in recorded and recorded[n][2] not in (None, mode)]
    if other:
        was = recorded[other[0]][2] or "none"
        raise BadInputError(f"{len(other)} image(s) of the store {store.path} were fitted to "
                            f"the model another way (first {other[0]!r}: resize {was})",
                            f"pass `resize={was}` as before, or "
                            "`overwrite=True` to extract them again")


# -- the store ----------------------------------------------------------------------------------

def _open_or_create(path: str, info: StoreInfo, overwrite: bool, config: dict) -> FeatureStore:
    """The store to extract into: the one at ``path`` (checked to be made the same way), or a
    new one where there is none, or (``overwrite``) instead of the one there."""
    if is_url(path):
        try:
            existing = FeatureStore.open(path, mode="r+")
        except StoreAccessError:
            raise
        except StoreError:
            existing = None
    else:
        content.finish_compact(path)
        existing = _open_local(Path(path), overwrite)
    if existing is not None and overwrite:
        log.info("replacing the store %s", path)
    if existing is None or overwrite:
        if not is_url(path):
            # zarr's own overwrite would parse a damaged zarr.json, and deleting in place races
            # with a task of an earlier attempt that still writes there.
            return _replace_local(Path(path), info, config)
        return FeatureStore.create(path, info, overwrite=existing is not None, config=config)
    # The image list may differ: the store follows its folder (content.plan).
    diffs = info.differences(existing.info, ignore=TOLERATED["extract"])
    if diffs:
        raise StoreMismatchError(f"{path} was made with other settings: " + "; ".join(diffs),
                                 "pass `overwrite=True` to replace it, or choose another "
                                 "store path")
    made = existing.create_missing_arrays()  # a run killed while creating the store
    if made:
        log.info("%s: created the arrays an interrupted run left out: %s", path, ", ".join(made))
    removed = existing.remove_partial_files()
    if removed:
        log.info("%s: removed %d temporary files of an interrupted run", path, removed)
    return existing


def _open_local(p: Path, overwrite: bool) -> FeatureStore | bool | None:
    """What a local store path holds: the store (opened for writing), True for a store of ours
    that ``overwrite`` replaces (an older format, a damaged one), or None for nothing to keep
    (no folder, an empty one, only temporary files of an interrupted run, a partial store
    that ``overwrite`` replaces). Anything else there is refused."""
    if not p.exists():
        return None
    if not p.is_dir():
        raise StoreError(f"{p} exists and is a file, not a feature store",
                         "choose another store path")
    if is_store(p):
        try:
            return FeatureStore.open(p, mode="r+")
        except StoreMismatchError:
            if not overwrite:
                raise
            return True  # an older format of ours: replaced
        except StoreError:
            if overwrite and integrity.looks_like_store(p):
                return True  # a damaged store of ours: replaced
            if integrity.looks_like_store(p):
                raise
    if integrity.only_temporary_files(p):
        # A writer killed while writing the store's first file: nothing to keep.
        log.info("%s holds only temporary files of an interrupted run: starting over", p)
        _remove_aside(p)
    elif any(p.iterdir()):
        if not (overwrite and integrity.looks_like_store(p)):
            raise StoreError(f"{p} exists and is not a ddpmseg feature store",
                             "choose another store path (nothing there was changed)")
        log.info("replacing the partial store %s", p)
        _remove_aside(p)
    return None


def _sibling(p: Path, what: str) -> Path:
    return p.with_name(f".{p.name}.{what}-{secrets.token_hex(4)}")


def _remove_leftovers(p: Path) -> None:
    """Delete the half-made (``new``) and set-aside (``replaced``) siblings that killed runs
    left beside ``p`` (under the writer lock: no other extract makes them now)."""
    for what in ("new", "replaced"):
        for left in p.parent.glob(f".{glob.escape(p.name)}.{what}-*"):
            if left.is_dir() and not left.is_symlink():
                log.info("removing %s, left by an interrupted run", left)
                shutil.rmtree(left, ignore_errors=True)


def _remove_aside(p: Path) -> None:
    """Delete a folder by first renaming it aside (one atomic step: the path is free at once,
    whatever a task of an earlier attempt still writes into the old folder). Through a
    symlink: the folder it points to, never the link itself."""
    p = Path(os.path.realpath(p))
    if not p.exists():
        return
    aside = _sibling(p, "replaced")
    p.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():  # a late write made a folder non-empty again: once more
        shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        log.warning("could not delete the replaced store %s (still written to?); delete it "
                    "by hand", aside)


def _replace_local(p: Path, info: StoreInfo, config: dict) -> FeatureStore:
    """A new local store at ``p``, made beside it and renamed into place: the path never holds
    a half-made store, and an old store there goes aside first (``_remove_aside``). Through a
    symlink: in the folder it points to, so the link stays a link."""
    p = Path(os.path.realpath(p))
    _remove_leftovers(p)
    new = _sibling(p, "new")
    FeatureStore.create(new, info, config=config)
    for _ in range(3):
        _remove_aside(p)
        try:
            new.rename(p)
            break
        except OSError as exc:  # a late write of an earlier attempt recreated the folder
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    else:
        raise StoreError(f"{p} keeps being recreated while it is replaced",
                         "stop the other writers (dask tasks of an earlier extract) and rerun")
    return FeatureStore.open(p, mode="r+")


# -- one process --------------------------------------------------------------------------------

def image_maps(backbone, x0: torch.Tensor, spec: FeatureSpec) -> list[list[torch.Tensor]]:
    """Run the backbone on an image batch (B, 3, H, W) in [-1, 1]: per image, its raw maps
    (C, h, w) in feature order, as the spec asks (steps, blocks, seed, precision)."""
    acts = backbone.activations(x0, spec.steps, spec.blocks, seed=spec.seed,
                                precision=spec.precision)
    return [[acts[key][j] for key in spec.keys] for j in range(x0.shape[0])]


def encoded_maps(backbone, x0: torch.Tensor, spec: FeatureSpec,
                 names: Sequence[str]) -> list[list[np.ndarray]]:
    """An image batch -> per image, its maps exactly as a store of ``spec`` holds them (cast
    to the store dtype and rounded to ``spec.keepbits``, shapes and float16 overflow checked:
    ``FeatureOverflowError`` names the image). ``extract`` runs these two steps with the
    encoding in writer threads; prediction from a folder of images runs them here."""
    return [encode_image(maps, spec, f"image {name}")
            for maps, name in zip(image_maps(backbone, x0, spec), names)]


def _load_batch(paths: Sequence[str], size: tuple[int, int], resize: bool | str,
                max_pixels: int | None, windows: Sequence = ()) -> torch.Tensor:
    if not any(w is not None for w in windows):
        return torch.stack([image_tensor(data.load_image(Path(p), size, resize, max_pixels))
                            for p in paths])
    out = []
    for p, k in zip(paths, windows):  # tiles: window k of its image
        image = data.load_image(Path(p), max_image_pixels=max_pixels)
        out.append(image_tensor(data.fit_image(image, data.layout(image.shape[:2], size,
                                                                  resize))[k or 0]))
    return torch.stack(out)


def shard_groups(info: StoreInfo, indices: Sequence[int]) -> list[list[int]]:
    """``indices`` (ascending) split where the shard changes."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and info.shard_of(groups[-1][-1]) == info.shard_of(i):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def batches_of(info: StoreInfo, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` in batches of ``batch_size``; in a sharded store no batch spans two shards,
    so a dask task that owns whole shards computes the same batches as one process."""
    if info.sharded:
        groups = shard_groups(info, indices)
    else:
        groups = [[int(i) for i in indices]] if len(indices) else []
    return [g[k:k + batch_size] for g in groups for k in range(0, len(g), batch_size)]


def _write_one(store: FeatureStore, i: int, maps: list, labels) -> int:
    store.write_image(i, store.encode(i, maps), labels, encoded=True)
    return i


def run_images(store: FeatureStore, backbone, job: _Job, indices: Sequence[int], labels: Sequence,
               on_done: Callable[[int], None] | None = None,
               writers: int = WRITER_THREADS) -> None:
    """Extract and write images ``indices`` (the loop shared by every way of running).

    The model runs in this thread; a loader thread prepares the next batch, and ``writers``
    threads cast, check, compress and write finished images. At most ``batch_size + writers``
    images wait to be written, which bounds memory.
    """
    size = tuple(store.info.image_size)
    batches = batches_of(store.info, indices, job.batch_size)
    if not batches:
        return
    store.plan_writes(indices)
    limit = job.batch_size + writers
    pending: deque = deque()

    def finish(block: bool) -> None:
        # Errors surface here, in order; progress is reported as soon as a write lands.
        while pending and (block or pending[0][1].done() or len(pending) > limit):
            pending.popleft()[1].result()

    def report(i: int):
        def callback(fut) -> None:
            if on_done is not None and not fut.cancelled() and fut.exception() is None:
                on_done(i)
        return callback

    with ThreadPoolExecutor(1, thread_name_prefix="ddpmseg-load") as loader, \
            ThreadPoolExecutor(writers, thread_name_prefix="ddpmseg-write") as pool:
        try:
            def load(batch):
                return loader.submit(_load_batch, [job.image_paths[i] for i in batch], size,
                                     job.resize, job.max_image_pixels,
                                     [job.windows[i] for i in batch] if job.windows else ())

            next_x = load(batches[0])
            for k, batch in enumerate(batches):
                x0 = next_x.result()
                if k + 1 < len(batches):
                    next_x = load(batches[k + 1])
                for i, maps in zip(batch, image_maps(backbone, x0, job.spec)):
                    fut = pool.submit(_write_one, store, i, maps,
                                      labels[i] if store.info.has_labels else None)
                    fut.add_done_callback(report(i))
                    pending.append((i, fut))
                del maps
                finish(block=False)
            finish(block=True)
            store.flush()
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            store.discard_writes()
            raise


# -- dask.distributed ---------------------------------------------------------------------------

def _load_source(source: dict):
    if source.get("checkpoint"):
        return load_backbone(source["checkpoint"], source["flags"], device=source["device"])
    return Backbone.random(source["flags"], seed=source["random_seed"], device=source["device"])


def _task_backbone(source: dict):
    """This worker's backbone for ``source`` (checkpoint or random seed, flags, device): the
    one its ``core.cluster.Opened`` keeps when it is the same, else loaded (one model per
    worker at a time); a fresh one outside a worker that has the plugin."""
    key = repr(sorted((k, repr(v)) for k, v in source.items()))
    return opened(("backbone", key), lambda: _load_source(source))


def _dask_task(job: _Job, source: dict, indices: list[int], labels: list):
    """One dask task: extract images ``indices`` (errors pickle with their hint). It writes
    only while the store has its attempt's writer token (``job.writer``)."""
    worker_must_see(job.store_path, "the feature store")
    for i in indices:
        worker_must_see(job.image_paths[i], f"image {i} of the store")
    store = FeatureStore.open(job.store_path, mode="r+")
    store.writer, store.guard = job.writer, True
    store.check_writer(indices[0])  # before loading the model for nothing
    backbone = _task_backbone(source)
    if BackboneId.of(backbone) != store.info.spec.backbone:
        raise StoreMismatchError(
            f"worker backbone ({source.get('checkpoint') or 'random'}) differs from the one "
            f"the store {job.store_path} was created with",
            "workers must see the same checkpoint file as the client")
    # The client sends only images not flagged complete: no need to read every flag here.
    store.assume_incomplete()
    full = [None] * len(store)
    for i, lab in zip(indices, labels):
        full[i] = lab
    run_images(store, backbone, job, indices, full, writers=1)
    return list(indices)


def _backbone_source(request: _Request, backbone) -> dict:
    """What a worker needs to load the same backbone itself (a checkpoint path, or a random
    model's seed), its flags and the device."""
    random_seed = BackboneId.of(backbone).random_seed
    if request.checkpoint:
        source = {"checkpoint": str(Path(request.checkpoint).expanduser().resolve())}
    elif random_seed is not None:
        source = {"checkpoint": "", "random_seed": random_seed}
    else:
        raise ConfigError("a scheduler needs the checkpoint path: each worker loads the model "
                          "itself", "pass `checkpoint=PATH`")
    source.update(flags=backbone.fingerprint().get("flags"), device=str(request.device))
    return source


def _run_distributed(request: _Request, info: StoreInfo, job: _Job, todo: list[int],
                     labels: list, backbone, update: Callable[[int], None]) -> None:
    source = _backbone_source(request, backbone)
    # Tasks of whole batches (a batch never spans two tasks, so the images are computed in the
    # same groups as in one process), and in a sharded store of whole shards (two workers
    # never write one shard): one task per shard's images to do.
    groups = shard_groups(info, todo) if info.sharded else batches_of(info, todo, job.batch_size)
    threads = torch.get_num_threads()
    tasks = run_tasks(request.scheduler, _dask_task,
                      [(job, source, g, [labels[i] for i in g]) for g in groups],
                      name="extract", threads=threads,
                      default_workers=workers_for(threads),
                      doing=f"extracting into {job.store_path}",
                      kept="the images already extracted are kept", plugins=[Opened()])
    with contextlib.closing(tasks):
        for done in tasks:
            update(len(done))

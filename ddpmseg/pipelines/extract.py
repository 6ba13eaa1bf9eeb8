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

import errno
import logging
import os
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from distributed import as_completed
from PIL import Image
from tqdm import tqdm

from ddpmseg import data as D
from ddpmseg.backbone import Backbone, ModelFlags, describe_backbone, load_backbone
from ddpmseg.backbone.base import image_tensor
from ddpmseg.spec import BackboneId
from ddpmseg.spec import block_id
from ddpmseg.backbone.bundled import BUNDLED_CHECKPOINTS, resolve_checkpoint
from ddpmseg.config import Config
from ddpmseg.core.errors import (
    BadInputError,
    ConfigError,
    StaleWriterError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.core.fileio import is_no_space, no_space_error
from ddpmseg.core.locking import writer_lock
from ddpmseg.core.renames import renamed_keyword
from ddpmseg.core.progress import wanted
from ddpmseg.core.cluster import absolute, check_scheduler, session, worker_must_see
from ddpmseg.featcache import content
from ddpmseg.featcache import integrity as IG
from ddpmseg.spec import PRECISIONS, STORE_DTYPES, FeatureSpec, short
from ddpmseg.featcache.store import FeatureStore, StoreInfo, encode_image, parse_codec

log = logging.getLogger(__name__)

# Threads that cast, compress and write finished images while the model runs.
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class _Inputs:
    samples: list            # data.Sample, sorted by name
    labels: list             # per image: uint8 (H, W) after the rare-class rule, or None
    has_labels: bool


@dataclass(frozen=True)
class _Job:
    """What an extraction task needs besides the backbone (picklable, for dask)."""

    store_path: str
    image_paths: tuple[str, ...]
    spec: FeatureSpec
    batch_size: int
    resize: bool
    # torch's intra-op threads of the client. Some CPU kernels (1x1 convolutions among them)
    # sum in an order that depends on the thread count, so a worker computes with the same
    # count as the client: then its features are bit-identical to a one-process run.
    threads: int = 0
    # The store's writer token of this attempt: a task stops when the store has another.
    writer: int = 0


def extract(data_dir, store_path, config: Config | None = None, checkpoint=None, *,
            backbone=None, device="auto", images_per_batch: int | None = None,
            precision: str | None = None, overwrite: bool = False, resize: bool = False,
            scheduler: str | None = None, progress: bool = True, prune: bool = False,
            compact: bool = False, repair: bool = False,
            batch_size: int | None = None) -> FeatureStore:
    """Extract the features of every image of ``data_dir`` into the store at ``store_path``.

    ``config``: steps, blocks, seed and dtype from ``config.features``; classes, ignore label
    and the rare-class rule from ``config.data``; model flags from ``config.model.preset`` and
    the checkpoint from ``checkpoint`` or ``config.model.checkpoint``. ``backbone``: an
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
    scheduler whose workers see the same files). Returns the store, opened for reading.
    """
    config = config or Config()
    fc, dc = config.features, config.data
    steps, blocks = tuple(int(t) for t in fc.steps), tuple(block_id(b) for b in fc.blocks)
    dtype, seed = fc.dtype, int(fc.seed)
    precision = precision or fc.precision
    batch_size = int(renamed_keyword("extract", "batch_size", batch_size, "images_per_batch",
                                     images_per_batch) or fc.images_per_batch)
    _check_settings(steps, blocks, dtype, precision, batch_size, dc)
    codec = parse_codec(fc.codec, dtype)
    check_scheduler(scheduler)  # before anything is written
    checkpoint = checkpoint if checkpoint not in (None, "") else (config.model.checkpoint or None)
    # A bundled name is recorded as given: the package's own path differs per install.
    recorded = str(checkpoint) if str(checkpoint) in BUNDLED_CHECKPOINTS else None
    checkpoint = resolve_checkpoint(checkpoint) if checkpoint else None

    flags = describe_backbone(backbone or checkpoint, config.model.preset)
    for t in steps:
        if not 0 <= t < flags.diffusion_steps:
            raise ConfigError(f"step {t} is out of range 0..{flags.diffusion_steps - 1}",
                              "check features.steps / --steps")
    size = (flags.image_size, flags.image_size)

    # 1. Read and check every mask (and every image's size) before anything is written.
    inputs = _read_inputs(data_dir, size, resize, dc)

    # 2. The backbone (its hash and flags identify the features).
    if backbone is None:
        if checkpoint is None:
            raise ConfigError("no checkpoint given",
                              "pass --checkpoint PATH or set model.checkpoint in the config")
        # The preset by name, when the config names one: a checkpoint of another preset is
        # then told which preset loads it, in one line, instead of its unfitting keys.
        backbone = load_backbone(checkpoint, config.model.preset or flags, device=device,
                                 prompt=config.model.prompt)
    shapes_by_block = backbone.block_shapes(blocks)
    spec = FeatureSpec(steps=steps, blocks=blocks,
                       shapes=tuple(tuple(shapes_by_block[b]) for _ in steps for b in blocks),
                       image_size=size, backbone=BackboneId.of(backbone), seed=seed,
                       dtype=dtype, precision=precision)
    info = StoreInfo(spec=spec, num_images=len(inputs.samples),
                     names=tuple(s.name for s in inputs.samples),
                     num_classes=dc.num_classes, ignore_label=dc.ignore_label,
                     class_names=tuple(dc.class_names), has_labels=inputs.has_labels,
                     min_class_pixels=dc.min_class_pixels, codec=codec)
    resolved = config.with_overrides(
        model={"checkpoint": recorded or (str(checkpoint) if checkpoint else "")},
        features={"precision": precision, "images_per_batch": batch_size})

    # 3.-4. Under the store's writer lock: create the store, or reopen it and check that it
    # was made the same way; make it follow the folder (appended, relabelled, re-extracted,
    # pruned images); then extract what is left.
    with writer_lock(store_path, "store"):
        store = _open_or_create(str(store_path), info, overwrite, resolved.to_dict())
        folder_hashes = content.sample_hashes(inputs.samples)
        labels_by_name = {s.name: lab for s, lab in zip(inputs.samples, inputs.labels)}
        changes = content.plan(store, folder_hashes, prune or compact)
        if repair or changes.describe() or not store.complete().all():
            # Tasks of earlier attempts stop at their next image. (A complete store that
            # stays as it is keeps its token: a rerun writes nothing, and no task of an
            # earlier attempt can still be at work, since each image it had is complete.)
            store.begin_attempt()
        content.apply(store, changes, labels_by_name)
        if compact:
            store = content.compact(store)
        info = store.info
        paths_by_name = {s.name: str(s.image) for s in inputs.samples}
        labels = content.labels_in_store_order(info.names, labels_by_name)
        todo, done = _images_to_do(store, repair, paths_by_name)
        # Absolute paths: a tcp:// scheduler's workers run in folders of their own.
        job = _Job(absolute(store_path),
                   tuple(absolute(paths_by_name[n]) if n in paths_by_name else ""
                         for n in info.names),
                   spec, batch_size, bool(resize), torch.get_num_threads(), store.writer)
        if todo:
            start = time.perf_counter()
            try:
                with _progress_bar(len(done), len(done) - len(todo), progress) as bar:
                    if scheduler:
                        _run_distributed(scheduler, job, todo, labels, backbone,
                                         checkpoint, device, bar.update)
                    else:
                        run_images(store, backbone, job, todo, labels,
                                   on_done=lambda i: bar.update(1))
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                left = int((~store.complete()).sum())
                raise no_space_error(store_path, left * _image_bytes(info), "the store",
                                     f"{left} image(s)") from exc
            _refuse_foreign(store)
            log.info("extracted %d images in %.1fs into %s (%d dims per pixel, %s)", len(todo),
                     time.perf_counter() - start, store_path, info.feature_dim, dtype)
    return FeatureStore.open(store_path)


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
    for i in np.flatnonzero(done):
        if repair:
            problems = [f"{name}: {what}" for name, what in store.damage(int(i))]
        else:
            problems = [f"{name} is missing" for name in store.missing_chunks(int(i))]
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
    width = 4 if info.dtype == "float32" else 2
    maps = sum(c * h * w for c, h, w in info.shapes) * width
    return maps + info.image_size[0] * info.image_size[1] + 64


# -- checking inputs ----------------------------------------------------------------------------

def _check_settings(steps, blocks, dtype, precision, batch_size, dc) -> None:
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"unknown store dtype {dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ConfigError(f"images per batch must be at least 1, got {batch_size}")
    for name, values in (("steps", steps), ("blocks", blocks)):
        if not values:
            raise ConfigError(f"no {name} given", f"set features.{name} or --{name}")
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} repeat a value: {list(values)}", "list each once")
        if any(isinstance(v, int) and v < 0 for v in values):
            raise ConfigError(f"{name} must be non-negative, got {list(values)}")
    if not 1 <= dc.num_classes <= 256:
        raise ConfigError(f"data.num_classes must be 1..256, got {dc.num_classes}")
    if not 0 <= dc.ignore_label <= 255:
        raise ConfigError(f"data.ignore_label must be 0..255, got {dc.ignore_label}")


def _read_inputs(data_dir, size: tuple[int, int], resize: bool, dc) -> _Inputs:
    samples = D.list_samples(data_dir)
    with_mask = [s for s in samples if s.mask is not None]
    if with_mask and len(with_mask) < len(samples):
        lone = next(s for s in samples if s.mask is None)
        raise BadInputError(
            f"image {lone.image} has no mask ({D.ACCEPTED_MASKS}) while "
            f"{len(with_mask)} of the {len(samples)} images in {data_dir} have one",
            "add its mask, or move it to a folder of unlabelled images (a folder without any "
            "mask makes a prediction-only store)")
    labels, unlabelled = [], []
    for s in samples:
        hw = D.image_hw(s.image)
        D.check_image_size(s.image, hw, size, resize)
        if s.mask is None:
            labels.append(None)
            continue
        # The mask must match its own image (--resize resizes both to the model's size).
        mask = D.load_mask(s.mask, hw, hint="make the mask the size of its image")
        D.check_labels(mask, dc.num_classes, dc.ignore_label, s.mask)
        if not D.labelled(mask, dc.ignore_label):
            unlabelled.append(s.mask.name)
        if hw != size:
            # Nearest neighbour: labels stay labels.
            mask = np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST),
                              dtype=np.uint8)
        labels.append(D.drop_rare_classes(mask, dc.num_classes, dc.ignore_label,
                                          dc.min_class_pixels))
    if unlabelled:  # fit trains on none of their pixels: say so rather than count them
        log.warning("note: %d mask(s) in %s hold only the ignore label %d, so their images are "
                    "unlabelled (no pixel to train on or score): %s", len(unlabelled), data_dir,
                    dc.ignore_label, ", ".join(unlabelled[:5])
                    + (", ..." if len(unlabelled) > 5 else ""))
    return _Inputs(samples, labels, bool(with_mask))


# -- the store ----------------------------------------------------------------------------------

def _is_local(path: str) -> bool:
    return "://" not in path


def _open_or_create(path: str, info: StoreInfo, overwrite: bool, config: dict) -> FeatureStore:
    hint = "pass --overwrite to replace it, or choose another store path"
    existing = None
    if _is_local(path):
        content.finish_compact(path)
    if _is_local(path) and Path(path).exists():
        p = Path(path)
        if not p.is_dir():
            raise StoreError(f"{path} exists and is a file, not a feature store",
                             "choose another store path")
        if (p / "zarr.json").is_file():
            try:
                existing = FeatureStore.open(path, mode="r+")
            except StoreMismatchError:
                if not overwrite:
                    raise
                existing = True  # an older format of ours: replaced below
            except StoreError:
                if not IG.looks_like_store(p):
                    existing = None
                elif overwrite:
                    existing = True  # a damaged store of ours: replaced below
                else:
                    raise
        if existing is None and IG.only_temporary_files(p):
            # A writer killed while writing the store's first file: nothing to keep.
            log.info("%s holds only temporary files of an interrupted run: starting over", path)
            _remove_aside(p)
        elif existing is None and any(p.iterdir()):
            if overwrite and IG.looks_like_store(p):
                log.info("replacing the partial store %s", path)
                _remove_aside(p)
            else:
                raise StoreError(f"{path} exists and is not a ddpmseg feature store",
                                 "choose another store path (nothing there was changed)")
    elif not _is_local(path):
        try:
            existing = FeatureStore.open(path, mode="r+")
        except StoreError:
            existing = None
    if existing is not None and overwrite:
        log.info("replacing the store %s", path)
        if _is_local(path):
            # zarr's own overwrite would parse a damaged zarr.json, and deleting in place races
            # with a task of an earlier attempt that still writes there.
            return _replace_local(Path(path), info, config)
        return FeatureStore.create(path, info, overwrite=True, config=config)
    if existing is None:
        if _is_local(path):
            return _replace_local(Path(path), info, config)
        return FeatureStore.create(path, info, overwrite=False, config=config)
    # The image list may differ: the store follows its folder (content.plan).
    diffs = info.differences(existing.info, ignore=("names",))
    if diffs:
        raise StoreMismatchError(f"{path} was made with other settings: " + "; ".join(diffs),
                                 hint)
    made = existing.create_missing_arrays()  # a run killed while creating the store
    if made:
        log.info("%s: created the arrays an interrupted run left out: %s", path, ", ".join(made))
    removed = existing.remove_partial_files()
    if removed:
        log.info("%s: removed %d temporary files of an interrupted run", path, removed)
    return existing


def _sibling(p: Path, what: str) -> Path:
    return p.with_name(f".{p.name}.{what}-{secrets.token_hex(4)}")


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


def _load_batch(paths: Sequence[str], size: tuple[int, int], resize: bool) -> torch.Tensor:
    return torch.stack([image_tensor(D.load_image(Path(p), size, resize)) for p in paths])


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
    batches = [list(indices[k:k + job.batch_size]) for k in range(0, len(indices), job.batch_size)]
    if not batches:
        return
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
                                     job.resize)

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
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress_bar(total: int, initial: int, enabled: bool):
    if not wanted(enabled):
        return _NullBar()
    return tqdm(total=total, initial=initial, unit="img", desc="extract", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


# -- dask.distributed ---------------------------------------------------------------------------

_WORKER_BACKBONES: dict = {}


def _worker_backbone(source: dict):
    """The backbone of a worker process, loaded once and kept for its later tasks."""
    key = repr(sorted((k, repr(v)) for k, v in source.items()))
    bb = _WORKER_BACKBONES.get(key)
    if bb is None:
        _WORKER_BACKBONES.clear()
        if source.get("checkpoint"):
            bb = load_backbone(source["checkpoint"], source["flags"], device=source["device"])
        else:
            bb = Backbone.random(source["flags"], seed=source["random_seed"],
                                 device=source["device"])
        _WORKER_BACKBONES[key] = bb
    return bb


def _dask_task(job: _Job, source: dict, indices: list[int], labels: list):
    """One dask task: extract images ``indices`` (errors pickle with their hint). It writes
    only while the store has its attempt's writer token (``job.writer``)."""
    worker_must_see(job.store_path, "the feature store")
    for i in indices:
        worker_must_see(job.image_paths[i], f"image {i} of the store")
    previous = torch.get_num_threads()
    try:
        if job.threads:
            torch.set_num_threads(job.threads)
        store = FeatureStore.open(job.store_path, mode="r+")
        store.writer, store.guard = job.writer, True
        store.check_writer(indices[0])  # before loading the model for nothing
        bb = _worker_backbone(source)
        if BackboneId.of(bb) != store.info.spec.backbone:
            raise StoreMismatchError(
                f"worker backbone ({source.get('checkpoint') or 'random'}) differs from the one "
                f"the store {job.store_path} was created with",
                "workers must see the same checkpoint file as the client")
        # The client sends only images not flagged complete: no need to read every flag here.
        store.assume_incomplete()
        full = [None] * len(store)
        for i, lab in zip(indices, labels):
            full[i] = lab
        run_images(store, bb, job, indices, full, writers=1)
        return list(indices)
    finally:
        torch.set_num_threads(previous)


def _run_distributed(scheduler: str, job: _Job, todo: list[int], labels: list, backbone,
                     checkpoint, device, update: Callable[[int], None]) -> None:
    random_seed = BackboneId.of(backbone).random_seed
    if checkpoint:
        source = {"checkpoint": str(Path(checkpoint).expanduser().resolve())}
    elif random_seed is not None:
        source = {"checkpoint": "", "random_seed": random_seed}
    else:
        raise ConfigError("a scheduler needs the checkpoint path: each worker loads the model "
                          "itself", "pass checkpoint= / --checkpoint")
    source.update(flags=backbone.fingerprint().get("flags"), device=str(device))
    # Tasks of whole batches (a batch never spans two tasks, so the images are computed in the
    # same groups as in one process).
    groups = [todo[k:k + job.batch_size] for k in range(0, len(todo), job.batch_size)]
    # Each worker computes with the client's torch thread count (see _Job.threads).
    workers = max(1, (os.cpu_count() or 1) // max(1, job.threads))
    with session(scheduler, workers, f"extracting into {job.store_path}",
                 "the images already extracted are kept") as client:
        futures = [client.submit(_dask_task, job, source, g, [labels[i] for i in g],
                                 pure=False, key=f"ddpmseg-extract-{g[0]}-{os.getpid()}")
                   for g in groups]
        try:
            for fut in as_completed(futures):
                update(len(fut.result()))
        except BaseException:
            for other in futures:
                other.cancel()
            raise

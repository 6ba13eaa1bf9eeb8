"""Minibatches of labelled pixels, streamed from a feature store in bounded memory.

The order of an epoch is a function of (seed, epoch, shuffle size P) only:

1. the training images (those with at least one labelled pixel) are permuted, and cut into
   consecutive chunks of P images;
2. within a chunk, the labelled pixels of its images (image by image in chunk order, each in
   raster order) are permuted;
3. the epoch's pixel stream is the concatenation of the chunks' streams, cut into minibatches
   of ``batch_size`` (the last one shorter; a last batch of one pixel joins the one before, as
   BatchNorm cannot train on a single pixel).

Every labelled pixel is visited exactly once per epoch. Two sources produce the features of
that stream:

* ``StreamSource``: a pool of whole images' native maps (as float32: see ``MapLayout``),
  filled from the store by a background *thread* (zarr 3's asyncio loop can deadlock in forked
  workers), with pixel features computed per run of minibatches from the pooled maps. When all
  training images fit the RAM budget they are loaded once and stay; otherwise the pool holds
  two chunks (the one being trained on and the next one, loading), so P = budget / (2 x bytes
  per image).
* ``InMemorySource``: the dense float32 features of every labelled pixel in RAM, as the
  reference keeps them (``--in-memory``; and what a streaming fit on a CPU uses whenever they
  fit the RAM budget: ``make_source``).

Both compute features with the same function from the same stored values and follow the same
order, so they produce identical minibatches: an ensemble trained either way is the same.
P is derived from the RAM budget in both cases (``shuffle_images``), so the budget, not the
source, decides the order; P = all images whenever they fit (a global shuffle, like the
reference's DataLoader).

The pooled maps' layout and the gather over them are ``ddpmseg.featcache.pixels.MapLayout``
(channels-last, grouped by resolution; the reference's align_corners=False taps); features come
out in the reference's order (step-major, then block), so the trainer's model reads them as
they are.

Cost (bench/fit_speed.py, 1 thread, shared 2-core CPU; README "Benchmarks"): when a chunk
arrives, its pixels' taps and weights are computed once in visiting order (``MapLayout.taps``);
each run of minibatches (``run_pixels``) is then one ``embedding_bag`` per resolution and one
``cat``. That gather still reads four float32 taps per feature value where the dense rows read
one, and it is memory-bound: about 0.9 ms per 64 pixels at 8448 dims against 0.2 ms for the
row copy (a ~9 ms training step). Hence ``make_source``: dense rows whenever they fit the
budget. Tried and dropped: a float16 pool, gathered with ``index_select`` and upcast before the
``embedding_bag`` (bit-identical, but the extra passes over (4n, C) temporaries cost 2-3x the
float32 gather; PyTorch's float16 ``embedding_bag`` rounds its output to float16, and no stock
kernel gathers float16 into float32), and computing minibatches ahead in a thread (the GIL
hand-offs cost more than they hide on 2 cores).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddpmseg.core.errors import BadInputError, StoreError
from ddpmseg.featcache import content
from ddpmseg.featcache.pixels import MapLayout

log = logging.getLogger(__name__)

# -- which pixels ---------------------------------------------------------------------------
@dataclass
class PixelIndex:
    """The labelled pixels of a store, concatenated image by image (raster order in each).

    ``offsets[i]:offsets[i+1]`` are image i's rows; ``flat`` its pixels' y * W + x, ``labels``
    their classes. A row number is also the pixel's row in the in-memory feature matrix.
    """

    offsets: np.ndarray        # (N + 1,) int64
    flat: np.ndarray           # (T,) int32
    labels: np.ndarray         # (T,) uint8
    image_size: tuple[int, int]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def images(self) -> np.ndarray:
        """Store indices of the images with at least one labelled pixel."""
        return np.flatnonzero(self.counts > 0)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_store(cls, store) -> "PixelIndex":
        info = store.info
        flats, labs, counts = [], [], []
        active = content.active_mask(store)
        for i in range(len(store)):
            if not active[i]:  # pruned (``extract --prune``): kept on disk, never trained on
                counts.append(0)
                continue
            lab = np.asarray(store.labels(i))
            flat = np.flatnonzero(lab.ravel() != info.ignore_label)
            y = lab.ravel()[flat]
            if y.size and int(y.max()) >= info.num_classes:
                bad = sorted(set(np.unique(y).tolist()) - set(range(info.num_classes)))
                raise BadInputError(
                    f"{store.path}: image {i} ({info.names[i]}) has labels {bad[:8]} outside "
                    f"0..{info.num_classes - 1} (ignore label {info.ignore_label})",
                    "re-extract with the right num_classes / ignore_label in [data]")
            flats.append(flat.astype(np.int32))
            labs.append(y.astype(np.uint8))
            counts.append(flat.size)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        empty = np.zeros(0, np.int32)
        return cls(offsets, np.concatenate(flats) if flats else empty,
                   np.concatenate(labs) if labs else empty.astype(np.uint8),
                   tuple(info.image_size))


def image_bytes(info) -> int:
    """Bytes of one image's native maps in the pool (float32 whatever the store's dtype: see
    ``MapLayout``)."""
    itemsize = torch.empty(0, dtype=MapLayout.dtype).element_size()
    return sum(c * h * w for c, h, w in info.shapes) * itemsize


def shuffle_images(num_train: int, per_image: int, budget_bytes: float) -> int:
    """P, the number of images shuffled together: all of them when they fit the budget, else
    as many as two chunks in the budget allow (at least 1)."""
    if num_train * per_image <= budget_bytes:
        return max(1, num_train)
    return max(1, int(budget_bytes // (2 * per_image)))


# -- in which order -------------------------------------------------------------------------
class EpochPlan:
    """The seeded order of every epoch (see the module docstring)."""

    def __init__(self, index: PixelIndex, chunk_images: int, seed: int, batch_size: int):
        self.index = index
        self.chunk_images = int(chunk_images)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.images = index.images
        total = int(index.counts[self.images].sum())
        q, r = divmod(total, self.batch_size)
        sizes = [self.batch_size] * q + ([r] if r else [])
        if len(sizes) >= 2 and sizes[-1] == 1:
            sizes[-2] += 1
            sizes.pop()
        self.batch_sizes = sizes
        self.pixels_per_epoch = total

    def image_chunks(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 0])
        order = self.images[rng.permutation(len(self.images))]
        p = self.chunk_images
        return [order[k:k + p] for k in range(0, len(order), p)]

    def chunk_rows(self, epoch: int, c: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image, row) of chunk c's pixels, in their visiting order."""
        counts = self.index.counts[images]
        starts = self.index.offsets[images]
        total = int(counts.sum())
        img = np.repeat(images, counts)
        rank = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(starts, counts) + rank
        perm = np.random.default_rng([self.seed, epoch, 1 + c]).permutation(total)
        return img[perm], rows[perm]


# -- sources ---------------------------------------------------------------------------------
class Chunk:
    """A chunk of images whose pixels' features can be computed now.

    ``prepare(img, rows)`` takes the chunk's pixels in visiting order (``EpochPlan.chunk_rows``)
    once and returns ``featurize(a, b)``: float32 (b - a, D) features of pixels a..b-1 of that
    order, on the device.
    """

    def __init__(self, images: np.ndarray, prepare, release=lambda: None):
        self.images = images
        self.prepare = prepare
        self.release = release


class InMemorySource:
    """Dense float32 features of every labelled pixel in RAM (the reference's way)."""

    def __init__(self, store, index: PixelIndex, device: torch.device, piece: int = 8192):
        self.device = device
        self.layout = layout = MapLayout(store.info, torch.device("cpu"))
        bufs = layout.allocate(1)
        zero = torch.zeros(1, dtype=torch.int64)
        self.x = torch.empty((index.total, layout.dim), dtype=torch.float32)
        for i in index.images:
            layout.put(bufs, 0, store.maps(int(i)))
            a, b = int(index.offsets[i]), int(index.offsets[i + 1])
            for s in range(a, b, piece):
                e = min(b, s + piece)
                flat = torch.from_numpy(index.flat[s:e].astype(np.int64))
                self.x[s:e] = layout.features(bufs, zero.expand(e - s), flat)
        del bufs

    def session(self, plan: EpochPlan) -> "_Session":
        def chunks(epoch):
            for images in plan.image_chunks(epoch):
                yield Chunk(images, self._prepare)
        return _Session(chunks)

    def _prepare(self, images, rows):
        rows = torch.from_numpy(rows)
        return lambda a, b: self._featurize(rows[a:b])

    def _featurize(self, rows):
        x = torch.index_select(self.x, 0, rows)
        return x.to(self.device, non_blocking=True) if self.device.type != "cpu" else x

    def close(self) -> None:
        self.x = None


class StreamSource:
    """A bounded pool of native maps, refilled from the store by a background thread."""

    def __init__(self, store, index: PixelIndex, device: torch.device, chunk_images: int):
        self.store = store
        self.index = index
        self.device = device
        self.layout = MapLayout(store.info, device)
        self.chunk_images = int(chunk_images)
        self.images = index.images
        self.resident = self.chunk_images >= len(self.images)
        self._resident_bufs = None
        self._slot_of = None

    # All training images fit: load them once, keep them for every member and epoch.
    def _load_resident(self):
        if self._resident_bufs is None:
            bufs = self.layout.allocate(len(self.images))
            slot_of = np.full(len(self.store), -1, dtype=np.int64)
            loader = _Loader(self.store, self.layout, [(None, self.images)], [bufs])
            try:
                loader.get()  # fills bufs
            finally:
                loader.close()
            slot_of[self.images] = np.arange(len(self.images))
            self._resident_bufs, self._slot_of = bufs, torch.from_numpy(slot_of)
        return self._resident_bufs, self._slot_of

    def session(self, plan: EpochPlan) -> "_Session":
        if self.resident:
            bufs, slot_of = self._load_resident()

            def prepare(images, rows):
                return self._prepare(bufs, slot_of, images, rows)

            def chunks(epoch):
                for images in plan.image_chunks(epoch):
                    yield Chunk(images, prepare)
            return _Session(chunks)

        def schedule(start):
            epoch = start
            while True:
                for images in plan.image_chunks(epoch):
                    yield epoch, images
                epoch += 1

        bufs = [self.layout.allocate(self.chunk_images) for _ in range(2)]
        slot_of = torch.full((len(self.store),), -1, dtype=torch.int64)
        state = {"loader": None, "next": None}

        def stop():
            if state["loader"] is not None:
                state["loader"].close()
                state["loader"] = None

        def chunks(epoch):
            # The loader runs ahead through the epochs in order; asking for any other epoch
            # than the next one restarts it there.
            if state["loader"] is None or state["next"] != epoch:
                stop()
                state["loader"] = _Loader(self.store, self.layout, schedule(epoch), bufs)
            loader = state["loader"]
            state["next"] = None
            for images in plan.image_chunks(epoch):
                (got_epoch, got), buf_id = loader.get()
                if got_epoch != epoch or not np.array_equal(got, images):  # pragma: no cover
                    raise StoreError("the pixel stream is out of step with its loader",
                                     "rerun the same fit: it resumes")
                slot_of[torch.from_numpy(images)] = torch.arange(len(images))
                b = bufs[buf_id]

                def prepare(imgs, rows, b=b):
                    return self._prepare(b, slot_of, imgs, rows)
                yield Chunk(images, prepare, release=lambda i=buf_id: loader.release(i))
            state["next"] = epoch + 1

        return _Session(chunks, stop)

    def _prepare(self, bufs, slot_of, images, rows):
        """The chunk's taps and weights, once, in visiting order; each run then slices them."""
        slots = slot_of[torch.from_numpy(images)].to(self.device)
        flat = torch.from_numpy(self.index.flat[rows].astype(np.int64)).to(self.device)
        taps, weights = self.layout.taps(slots, flat)
        return lambda a, b: self._features(bufs, taps[:, a:b], weights[:, a:b])

    def _features(self, bufs, taps, weights):
        return self.layout.gather(bufs, taps, weights)

    def close(self) -> None:
        self._resident_bufs = None


def dense_bytes(index: PixelIndex, dim: int) -> int:
    """Bytes of the dense float32 features of every labelled pixel (``InMemorySource.x``)."""
    return index.total * dim * 4


def make_source(store, index: PixelIndex, device: torch.device, shuffle: int,
                budget_bytes: float, in_memory: bool = False):
    """The fit's source of features: ``InMemorySource`` when asked (``in_memory``), or when
    streaming on a CPU and the dense features of every labelled pixel, with the one image's
    maps they are built from, fit the RAM budget (a row copy per minibatch reads a quarter of
    the bytes of the pool gather, and the minibatches are the same); else ``StreamSource``,
    whose pool the budget bounds. The order (P = ``shuffle``) is the budget's either way."""
    if in_memory:
        return InMemorySource(store, index, device)
    need = dense_bytes(index, store.info.feature_dim) + image_bytes(store.info)
    if device.type == "cpu" and need <= budget_bytes:
        log.info("streaming: the dense features of the %d labelled pixels (%.2f GB) fit the RAM "
                 "budget (%.2f GB): held in RAM, as --in-memory does", index.total,
                 need / 2 ** 30, budget_bytes / 2 ** 30)
        return InMemorySource(store, index, device)
    return StreamSource(store, index, device, shuffle)


class _Session:
    """One member's pass over the epochs of a source; ``close`` stops its loader."""

    def __init__(self, chunks, close=lambda: None):
        self.chunks = chunks
        self._close = close

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Loader:
    """Background thread: for each scheduled chunk, waits for a free buffer, fills it with the
    chunk's images' maps and hands it over. A thread, not a process: zarr's event loop does not
    survive fork."""

    def __init__(self, store, layout: MapLayout, schedule, bufs: list):
        self.store = store
        self.layout = layout
        self.bufs = bufs
        self.free: queue.Queue = queue.Queue()
        for k in range(len(bufs)):
            self.free.put(k)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iter(schedule),),
                                       name="ddpmseg-pool-loader", daemon=True)
        self.thread.start()

    def _run(self, schedule: Iterator):
        try:
            for item in schedule:
                buf_id = self._take_free()
                if buf_id is None:
                    return
                _, images = item
                for slot, i in enumerate(images):
                    if self.stop.is_set():
                        return
                    self.layout.put(self.bufs[buf_id], slot, self.store.maps(int(i)))
                self.ready.put((item, buf_id))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self.ready.put(exc)

    def _take_free(self):
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def get(self):
        while True:
            try:
                item = self.ready.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise StoreError("the feature loader thread stopped unexpectedly",
                                     "rerun; if it persists, check the store") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def release(self, buf_id: int) -> None:
        self.free.put(buf_id)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# -- minibatches -----------------------------------------------------------------------------
# Features are gathered for a run of consecutive minibatches at once (about this many bytes of
# float32), so the per-call cost of the gather (a few dozen small tensor ops) is paid once per
# run, not once per 64 pixels. Both sources cut the same runs, so their minibatches are the same
# tensors, laid out alike in memory.
RUN_BYTES = 4 * 2 ** 20


def run_pixels(batch_size: int, dim: int, run_bytes: int = RUN_BYTES) -> int:
    """Pixels per gather: a whole number of minibatches, at least one, about ``run_bytes``."""
    return max(1, run_bytes // (4 * max(1, dim) * batch_size)) * batch_size


def batches(plan: EpochPlan, session: _Session, epoch: int, device: torch.device,
            dim: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The minibatches (features float32 (B, D), labels int64 (B,)) of one epoch.

    A minibatch is a view into its run's feature tensor (or, where it straddles two chunks,
    a concatenation). (Computing batches ahead in a thread was tried: on a 2-core machine the
    GIL hand-offs between it and the training step cost more than they hid.)
    """
    sizes = plan.batch_sizes
    labels = plan.index.labels
    extra = run_pixels(plan.batch_size, dim) - plan.batch_size
    bi, need = 0, (sizes[0] if sizes else 0)
    xs, ys = [], []
    for c, chunk in enumerate(session.chunks(epoch)):
        try:
            img, rows = plan.chunk_rows(epoch, c, chunk.images)
            featurize = chunk.prepare(img, rows)
            pos, n = 0, len(rows)
            while pos < n:
                # The rest of the current minibatch and a few whole ones, in one gather.
                run = min(n - pos, need + extra)
                feats = featurize(pos, pos + run)
                q = 0
                while q < run:
                    take = min(need, run - q)
                    xs.append(feats[q:q + take])
                    ys.append(labels[rows[pos + q:pos + q + take]])
                    q += take
                    need -= take
                    if need == 0:
                        x = xs[0] if len(xs) == 1 else torch.cat(xs)
                        y = torch.from_numpy(np.concatenate(ys).astype(np.int64)).to(device)
                        xs, ys = [], []
                        bi += 1
                        need = sizes[bi] if bi < len(sizes) else 0
                        yield x, y
                pos += run
        finally:
            chunk.release()

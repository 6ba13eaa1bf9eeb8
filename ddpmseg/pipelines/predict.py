"""Prediction: a trained ensemble + a feature store or a folder of images -> label maps.

Prediction works in row tiles: for ``tile_rows`` rows of an image at a time, the dense pixel
features of those rows are computed from the image's native-resolution maps, every member of the
ensemble runs on them, and the members' logits are voted into labels. Peak memory is bounded by
one image's native maps plus one tile's features (tile_rows x W x D floats), never by the
image's full dense feature tensor (2.2 GB for 256x256 at 8448 dims) nor by the ensemble size.

From a folder of images, features are extracted on the fly with the run's backbone (checkpoint
and flags recorded in the training store's fingerprint), image by image, and never written out.

Library entry point: :func:`predict`; the per-image core is :func:`predict_maps`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ddpmseg.backbone import factory
from ddpmseg.backbone.base import image_tensor
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.classifier import Ensemble, load_ensemble
from ddpmseg.classifier.run import read_header
from ddpmseg.core.cluster import absolute, check_scheduler, opened, worker_must_see
from ddpmseg.core.device import resolve_device, use_threads
from ddpmseg.core.errors import (
    BadInputError,
    CheckpointError,
    ConfigError,
    InputNotFoundError,
    RunError,
    StoreError,
    StoreMismatchError,
)
from ddpmseg.core.fileio import (
    is_no_space,
    is_url,
    no_space_error,
    sha256_file,
    size_text,
    write_json,
)
from ddpmseg.core.locking import reader_lock, writer_lock
from ddpmseg.core.progress import bar
from ddpmseg.core.version import __version__
from ddpmseg import data
from ddpmseg.featcache import content, pixels
from ddpmseg.featcache.store import FeatureStore, decode_map, is_store
from ddpmseg.outputs import folder, render, voting
from ddpmseg.pipelines import spread
from ddpmseg.pipelines.extract import encoded_maps
from ddpmseg.spec import TOLERATED, FeatureSpec

log = logging.getLogger(__name__)

__all__ = ["predict", "predict_maps", "ImagePrediction", "load_run", "check_compatible",
           "SUMMARY_IMAGES"]

# Rows of the contact sheet summary.png.
SUMMARY_IMAGES = 8
# Overlays of small images are enlarged so their legend can be read.
OVERLAY_MIN_SIDE = 256
# Images that get pictures (overlay, uncertainty PNG) by default; every image gets its label
# maps. Drawing and writing an overlay costs about what predicting a 64 px image does.
PICTURE_IMAGES = 100

@dataclass
class ImagePrediction:
    labels: np.ndarray                 # uint8 (H, W)
    entropy: np.ndarray | None = None  # float32 (H, W), nats
    jsd: np.ndarray | None = None      # float32 (H, W), nats


# -- the per-image core -------------------------------------------------------------------------
@torch.no_grad()
def predict_maps(members: Sequence[nn.Module], maps: Sequence, size: tuple[int, int], *,
                 vote: str = "soft", tile_rows: int = 32, uncertainty: bool = False,
                 device: torch.device | str | None = None) -> ImagePrediction:
    """Labels (and uncertainty) of one image from its native (C, h, w) maps in feature order.

    Rows y0..y0+tile_rows-1 at a time: their dense features -> every member -> vote. Each
    pixel's result depends on nothing but its own features, so not on ``tile_rows``.
    """
    voting.check_vote(vote)
    if tile_rows < 1:
        raise ConfigError(f"tile_rows must be >= 1, got {tile_rows}", "pass `tile_rows=32`")
    height, width = size
    labels = np.empty((height, width), dtype=np.uint8)
    entropy = np.empty((height, width), dtype=np.float32) if uncertainty else None
    jsd = np.empty((height, width), dtype=np.float32) if uncertainty else None
    for y0, y1, logits in _row_logits(members, maps, size, tile_rows, device):
        tile = voting.vote(logits, vote)
        labels[y0:y1] = tile.view(y1 - y0, width).to(torch.uint8).cpu().numpy()
        if uncertainty:
            ent, div = voting.uncertainty(logits)
            entropy[y0:y1] = ent.view(y1 - y0, width).cpu().numpy()
            jsd[y0:y1] = div.view(y1 - y0, width).cpu().numpy()
    return ImagePrediction(labels, entropy, jsd)


def _row_logits(members: Sequence[nn.Module], maps: Sequence, size: tuple[int, int],
                tile_rows: int, device):
    """(y0, y1, float32 (members, n, classes) logits of rows y0..y1-1), row block by row
    block: the dense features of a few rows at a time, so memory stays bounded."""
    height = size[0]
    device = torch.device(device) if device is not None else None
    tiles = pixels.TileFeatures(maps, size, device)
    for y0 in range(0, height, tile_rows):
        y1 = min(y0 + tile_rows, height)
        # (n, D): a transposed view, no copy
        yield y0, y1, _member_logits(members, tiles.rows(y0, y1).T)


def _member_logits(members: Sequence[nn.Module], feats: torch.Tensor) -> torch.Tensor:
    """float32 (members, n, classes) of the pixels' features ``feats`` (n, D); an ensemble of
    more classes than a uint8 label map holds is refused, at the model's size or the image's."""
    logits = torch.stack([m(feats).float() for m in members])
    if logits.shape[-1] > 256:
        raise RunError(f"the ensemble has {logits.shape[-1]} classes; label maps hold at "
                       "most 256", "use at most 256 classes")
    return logits


# -- predictions at the image's own size -----------------------------------------------------
@torch.no_grad()
def score_map(members: Sequence[nn.Module], maps: Sequence, size: tuple[int, int], *,
              vote: str = "soft", tile_rows: int = 32, uncertainty: bool = False,
              device: torch.device | str | None = None) -> torch.Tensor:
    """float32 (K, H, W) at the model's ``size``: the ensemble's class scores
    (``voting.scores``: mean probabilities for a soft vote), then with ``uncertainty`` the
    entropy and the members' JSD. Rows as in ``predict_maps``."""
    height, width = size
    out = None
    for y0, y1, logits in _row_logits(members, maps, size, tile_rows, device):
        parts = [voting.scores(logits, vote)]
        if uncertainty:
            parts += [t[:, None] for t in voting.uncertainty(logits)]
        block = torch.cat(parts, dim=1).T
        if out is None:
            out = torch.empty((block.shape[0], height * width), device=block.device)
        out[:, y0 * width:y1 * width] = block
    return out.view(-1, height, width)


@torch.no_grad()
def at_original_size(scores: Sequence[torch.Tensor], lay: data.Layout, *,
                     uncertainty: bool = False, tile_rows: int = 32) -> ImagePrediction:
    """The prediction of an image of ``lay.hw`` from the ``score_map`` of each of its
    model-size inputs (``data.fit_image``): stretch and pad crop the image's part and resize
    it bilinearly (align_corners False) to the image's size; tiles average their overlaps.
    Then the argmax, as segmentation toolkits predict at the original shape."""
    height, width = lay.hw
    if lay.mode == "tiles":
        sh, sw = lay.size
        total = torch.zeros((scores[0].shape[0],) + lay.padded, device=scores[0].device)
        count = torch.zeros(lay.padded, device=scores[0].device)
        for (y, x), s in zip(lay.windows(), scores):
            total[:, y:y + sh, x:x + sw] += s
            count[y:y + sh, x:x + sw] += 1
        full = (total / count)[:, :height, :width]

        def rows(y0, y1):
            return full[:, y0:y1].reshape(full.shape[0], -1)
    else:
        top, left, ih, iw = lay.inner
        crop = scores[0][:, top:top + ih, left:left + iw].contiguous()
        rows = pixels.TileFeatures([crop], lay.hw, crop.device).rows
    num = scores[0].shape[0] - (2 if uncertainty else 0)
    labels = np.empty((height, width), dtype=np.uint8)
    extra = [np.empty((height, width), dtype=np.float32) for _ in range(2 if uncertainty else 0)]
    for y0 in range(0, height, tile_rows):
        y1 = min(y0 + tile_rows, height)
        block = rows(y0, y1)
        labels[y0:y1] = block[:num].argmax(dim=0).view(y1 - y0, width).to(torch.uint8).cpu()
        for k, arr in enumerate(extra):
            arr[y0:y1] = block[num + k].view(y1 - y0, width).cpu().numpy()
    return ImagePrediction(labels, *extra) if extra else ImagePrediction(labels)


def predict_item(members: Sequence[nn.Module], views: Sequence, size: tuple[int, int],
                 lay: data.Layout | None, **settings) -> ImagePrediction:
    """One image's prediction from the native maps of each of its model-size inputs
    (``views``): at its own size (``lay.hw``) when ``lay`` says how it was fitted, else at
    the model's size exactly as ``predict_maps`` predicts. ``settings``: vote, tile_rows,
    uncertainty, device."""
    if lay is None or lay.mode == "same":
        return predict_maps(members, views[0], size, **settings)
    voting.check_vote(settings.get("vote", "soft"))
    scores = [score_map(members, maps, size, **settings) for maps in views]
    return at_original_size(scores, lay, uncertainty=settings.get("uncertainty", False),
                            tile_rows=settings.get("tile_rows", 32))


# -- the run --------------------------------------------------------------------------------
def load_run(run, device: torch.device) -> Ensemble:
    """A run directory -> its Ensemble on ``device``; an Ensemble is moved there."""
    if isinstance(run, Ensemble):
        return Ensemble(run.members, run.info, run.config, run.run_dir, device,
                        run.store_path, run.metas)
    path = Path(run)
    if not path.is_dir():
        raise InputNotFoundError(f"run directory {path} does not exist",
                                 "give the directory `ddpmseg fit` wrote")
    return load_ensemble(path, device)


def check_compatible(run_spec: FeatureSpec, store_spec: FeatureSpec,
                     store_path: str = "store") -> None:
    """The store must hold the features the run was trained on (same model, steps, blocks,
    shapes, image size); else StoreMismatchError saying what differs. A seed, dtype,
    precision or rounding (lossy codec) of its own is only a warning, one line per field."""
    tolerated = TOLERATED["predict"]
    diffs = run_spec.differences(store_spec, "in the run", "in the store", ignore=tolerated)
    if diffs:
        raise StoreMismatchError(
            f"feature store {store_path} does not match the run's training store: "
            + "; ".join(diffs),
            "extract the images with the run's checkpoint, steps and blocks, or predict from "
            "the image folder")
    for note in run_spec.differences(store_spec, "in the run", "in the store", only=tolerated):
        log.warning("note: %s has other features than the run was trained on: %s", store_path,
                    note)


def _warn_if_stale(model: Ensemble) -> None:
    """Warn when the run's training store has changed (labels corrected, images added) since
    the run was trained: its predictions do not use the newest labels."""
    if model.run_dir is None or not model.store_path or not is_store(model.store_path):
        return
    trained_on = read_header(model.run_dir).images
    if trained_on is None:
        return  # a run from before runs recorded their image set
    try:
        store = FeatureStore.open(model.store_path)
    except StoreError:
        return
    changes = content.image_set_changes(trained_on, content.image_set(store))
    if changes:
        log.warning("the run %s is older than the labels of its store %s: since it was trained, "
                    "%s; refit (`ddpmseg fit %s NEW_RUN_DIR`) to use them", model.run_dir,
                    model.store_path, "; ".join(changes), model.store_path)


# -- inputs ---------------------------------------------------------------------------------
@dataclass
class _Item:
    name: str
    image: np.ndarray | None   # RGB uint8 for the overlay, None = draw on grey
    views: list                # per model-size input (tiles: several), its native maps
    layout: data.Layout | None = None  # how the image was fitted; None: model size out

    @property
    def maps(self) -> list | None:
        """The native maps of the (first) model-size input; None once released."""
        return self.views[0] if self.views else None

    @maps.setter
    def maps(self, value) -> None:  # None releases them
        self.views = None if value is None else [value]


def reading_source(path: Path):
    """A shared lock on a store for as long as it is read (no writer meanwhile: an `extract
    --compact` or `--overwrite` swaps in a store whose image numbers mean other images);
    nothing for an image folder."""
    return reader_lock(path, "store") if is_store(path) else contextlib.nullcontext()


def _find_original(images_dir: Path | None, name: str) -> Path | None:
    return data.find_image(images_dir, name) if images_dir is not None else None


class _StoreSource:
    kind = "store"

    def __init__(self, path: Path | str, model: Ensemble, images_dir: Path | None,
                 max_image_pixels: int | None = None, at_model_size: bool = False):
        self.store = FeatureStore.open(path)
        check_compatible(model.info.spec, self.store.info.spec, str(path))
        done = self.store.complete()
        missing = [n for n, ok in zip(self.store.names, done) if not ok]
        if missing:
            raise StoreError(f"feature store {path} has {len(missing)} incomplete image(s), "
                             f"first {missing[0]!r}", "rerun `ddpmseg extract` to finish it")
        if images_dir is not None and not images_dir.is_dir():
            raise InputNotFoundError(f"images folder {images_dir} does not exist",
                                     "give the folder of the original images, or no "
                                     "`images` folder to draw overlays on grey")
        self.images_dir = images_dir
        self.max_image_pixels = max_image_pixels
        self.size = tuple(self.store.info.image_size)
        self.names = list(self.store.names)
        self.sizes = {} if at_model_size else content.read_state(self.store).sizes
        # (A store that extract did not make, with no record of its images, gets no note.)
        made_by_extract = self.store.images_attribute() is not None or self.store.config
        if not at_model_size and not self.sizes and made_by_extract:
            log.warning("note: %s records no original image sizes (extracted before ddpmseg "
                        "recorded them): predictions at the model's size %s; extract again "
                        "to get them at each image's own size", path, data.size_text(self.size))

    def layout(self, name: str) -> data.Layout | None:
        """How the stored image of ``name`` was fitted to the model (None: not recorded)."""
        rec = self.sizes.get(name)
        if not rec or rec[2] is None or rec[2] == "tiles":
            return None  # a tile of a store is predicted as the model-size image it is
        return data.Layout((int(rec[0]), int(rec[1])), self.size, rec[2])

    def __len__(self) -> int:
        return len(self.names)

    def image_content(self) -> dict[str, tuple[str | None, bool]]:
        """{name: (image sha256 as extract recorded it, or None; has labels other than the
        ignore label)}."""
        recorded = content.read_state(self.store).hashes
        info = self.store.info
        # A mask of only the ignore label labels nothing: its image counts as unlabelled.
        return {n: ((recorded.get(n) or [None])[0],
                    info.has_labels and data.labelled(self.store.labels(i), info.ignore_label))
                for i, n in enumerate(self.names)}

    def items(self, skip: Collection[str] = ()) -> Iterator[_Item]:
        for i, name in enumerate(self.names):
            if name in skip:
                continue
            original = _find_original(self.images_dir, name)
            image = None
            if original is not None:
                image = data.load_image(original, max_image_pixels=self.max_image_pixels)
            elif self.images_dir is not None:
                log.warning("no original image for %s in %s; overlay drawn on grey", name,
                            self.images_dir)
            yield _Item(name, image, [self.store.maps(i)], self.layout(name))


class _ImageSource:
    kind = "images"

    def __init__(self, path: Path, model: Ensemble, device: torch.device,
                 checkpoint: str | None, resize: bool | str, max_image_pixels: int | None = None,
                 at_model_size: bool = False):
        self.max_image_pixels = max_image_pixels
        self.at_model_size = at_model_size
        self.samples = data.list_samples(path, max_image_pixels=max_image_pixels)
        self.spec = model.info.spec
        self.size = self.spec.image_size
        self.resize = data.resize_mode(resize)
        if at_model_size and self.resize == "tiles":
            raise BadInputError("tiles have no one picture at the model's size",
                                "pass `resize=stretch` or `resize=pad` with "
                                "`at_model_size=True`")
        self.device = device
        self.ignore_label = model.info.ignore_label
        # Check every image's size before the (slow) backbone load and before any output
        # (each stretch is noted here, once).
        for s in self.samples:
            hw = data.image_hw(s.image, max_image_pixels)
            data.check_image_size(s.image, hw, self.size, resize)
        self.checkpoint = _resolve_checkpoint(checkpoint, model)
        self.names = [s.name for s in self.samples]
        want = self.spec.backbone
        try:
            self.backbone = factory.load_backbone(self.checkpoint,
                                                  want.flags or model.config.model.preset, device)
        except CheckpointError:
            # Another architecture's file: that it is not the run's checkpoint is the news,
            # not which of its keys do not fit.
            if want.sha256 and self.checkpoint.is_file():
                _check_sha256(self.checkpoint, sha256_file(self.checkpoint), want.sha256)
            raise
        if want.sha256:
            # from_checkpoint hashes the file as it loads it; hash it here only if it did not.
            got = getattr(self.backbone, "sha256", "") or sha256_file(self.checkpoint)
            _check_sha256(self.checkpoint, got, want.sha256)

    def __len__(self) -> int:
        return len(self.samples)

    def image_content(self) -> dict[str, tuple[str | None, bool]]:
        """{name: (image sha256, has a mask labelling at least one pixel)}."""
        return {s.name: (sha256_file(s.image), s.mask is not None
                         and data.labelled(data.read_mask(s.mask, self.max_image_pixels),
                                      self.ignore_label))
                for s in self.samples}

    def items(self, skip: Collection[str] = ()) -> Iterator[_Item]:
        for sample in self.samples:
            if sample.name in skip:
                continue
            image = data.load_image(sample.image, max_image_pixels=self.max_image_pixels)
            lay = data.layout(image.shape[:2], self.size, self.resize)
            views = data.fit_image(image, lay)
            if self.at_model_size:
                image, lay = views[0], None  # today's output: the image as the model saw it
            yield _Item(sample.name, image, [self._maps(v, sample.name) for v in views], lay)

    def _maps(self, image: np.ndarray, name: str) -> list:
        x0 = image_tensor(image)[None].to(self.device)
        with torch.no_grad():
            # The path `extract` takes: the maps equal those a store of the images holds,
            # rounded as the run's training store (the run's spec) rounded them.
            (encoded,) = encoded_maps(self.backbone, x0, self.spec, [name])
        return [decode_map(m, self.spec.dtype) for m in encoded]


def _check_sha256(checkpoint: Path, got: str, want: str) -> None:
    if got != want:
        raise StoreMismatchError(
            f"checkpoint {checkpoint} is not the run's checkpoint (sha256 {got[:12]}, "
            f"expected {want[:12]})",
            "give `checkpoint=PATH`, the checkpoint the run's store was extracted with")


def input_path(input) -> Path | str:
    """The path of a prediction input (a URL, a store's, as it is); an open FeatureStore (as
    extract returns) by its path."""
    given = getattr(input, "path", input)
    if is_url(given):
        return str(given)  # Path() would turn s3://b/x.zarr into the local s3:/b/x.zarr
    path = Path(given)
    if not path.exists():
        raise InputNotFoundError(f"input {path} does not exist",
                                 "give a feature store or a folder of images")
    return path


def open_source(path: Path | str, model: Ensemble, device: torch.device, checkpoint: str | None,
                resize: bool | str, images_dir: Path | None = None,
                max_image_pixels: int | None = None, at_model_size: bool = True):
    """The images of a store or an image folder, as items (name, RGB image, native maps) the
    run can predict: ``source.items(skip=names)``, ``len(source)``, ``source.size``,
    ``source.kind``, ``source.names``; ``source.image_content()`` says per name its image
    sha256 (None where a store recorded none) and whether a mask labels a pixel of it. Images
    and PNG masks of more than ``max_image_pixels`` pixels (default PIL's limit) are refused.
    ``resize``: False, True or a mode of ``spec.RESIZE_MODES``. Each item's ``layout`` says
    how its image was fitted to the model (None with ``at_model_size``, the default here)."""
    if is_store(path):
        return _StoreSource(path, model, images_dir, max_image_pixels, at_model_size)
    if path.is_dir():
        return _ImageSource(path, model, device, checkpoint, resize, max_image_pixels,
                            at_model_size)
    raise BadInputError(f"input {path} is neither a feature store nor a folder of images",
                        "give a store made by `ddpmseg extract` or an image folder")


def _resolve_checkpoint(checkpoint: str | None, model: Ensemble) -> Path:
    given = checkpoint or model.config.model.checkpoint
    if not given:
        raise RunError("the run records no backbone checkpoint to extract features with",
                       "give `checkpoint=PATH` (the checkpoint of the run's training store)")
    path = resolve_checkpoint(given).expanduser()  # "bundled:faces_64" too
    if not path.exists() and not path.is_absolute() and model.run_dir:
        beside = Path(model.run_dir) / path
        if beside.exists():
            path = beside
    if not path.exists():  # a .pt file, or a diffusers folder
        raise InputNotFoundError(f"checkpoint {path} not found",
                                 "give `checkpoint=PATH`, the run's backbone checkpoint")
    return path


# -- outputs --------------------------------------------------------------------------------
def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a buffer: numpy writing straight to a file reports a full disk as "4096
    # requested and 2016 written", without errno; a plain write raises ENOSPC.
    buffer = io.BytesIO()
    np.save(buffer, array)
    with open(path, "wb") as fh:  # np.save(path) would append ".npy" to a temporary name
        fh.write(buffer.getbuffer())


def _write_image_outputs(out: Path, item: _Item, pred: ImagePrediction, palette: np.ndarray,
                         model: Ensemble, names: tuple, uncertainty: bool,
                         pictures: bool = True) -> tuple[dict, tuple]:
    """Write one image's files into ``out`` (the staging folder); returns their paths there.
    Without ``pictures``, no overlay and no uncertainty PNG (the maps still)."""
    info = model.info
    files = {}
    files["png"] = folder.image_file(out, item.name, "png")
    render.save_label_png(files["png"], pred.labels, palette)
    if pictures:
        over = render.overlay(item.image, pred.labels, palette, names, info.num_classes,
                              min_side=OVERLAY_MIN_SIDE)
        files["overlay"] = folder.image_file(out, item.name, "overlay")
        Image.fromarray(over).save(files["overlay"])
    if uncertainty:
        files["entropy"] = folder.image_file(out, item.name, "entropy")
        _save_npy(files["entropy"], pred.entropy)
        files["jsd"] = folder.image_file(out, item.name, "jsd")
        _save_npy(files["jsd"], pred.jsd)
        if pictures:
            files["uncertainty"] = folder.image_file(out, item.name, "uncertainty")
            render.uncertainty_image(pred.entropy, pred.jsd, info.num_classes,
                                     len(model.members)).save(files["uncertainty"])
    files["npy"] = folder.image_file(out, item.name, "npy")
    _save_npy(files["npy"], pred.labels)
    row = (item.name, item.image, pred.labels)
    return {k: str(v) for k, v in files.items()}, row


def predict(run, input, out_dir, *, vote: str | None = None, uncertainty: bool = False,
            device: str | torch.device = "auto", tile_rows: int | None = None,
            resize: bool | str = False, checkpoint: str | None = None, images: str | None = None,
            progress: bool = True, threads: int | None = None,
            max_image_pixels: int | None = None, all_pictures: bool = False,
            scheduler: str | None = None, at_model_size: bool = False) -> dict:
    """Predict every image of INPUT (a feature store or a folder of images) with RUN.

    ``run`` is a run directory (``ddpmseg fit``'s output) or a ``classifier.Ensemble``.
    Writes into ``out_dir`` per image ``<name>.npy`` (uint8 labels), ``<name>.png`` (palette
    PNG), ``<name>_overlay.png`` and, with ``uncertainty``, ``<name>_entropy.npy``,
    ``<name>_jsd.npy``, ``<name>_uncertainty.png``; once: ``palette.json``, ``summary.png`` and
    ``predict.json`` (the folder's schema: ``outputs.folder``). ``vote`` and ``tile_rows``
    default to the run config's [predict] values. ``images`` is a folder of the originals for
    the overlays when INPUT is a store. Label maps, pictures and uncertainty are at each
    image's own size (the ensemble's mean scores resized bilinearly, then the argmax; a store
    must have recorded the sizes, else the model's size with a note); ``at_model_size`` keeps
    them at the model's size. ``resize`` fits images of another size to the model: True (the
    default way, ``spec.DEFAULT_RESIZE``), "stretch", "pad" (letterbox) or "tiles"
    (overlapping windows at the image's resolution). Torch runs on ``threads`` threads (default: torch's),
    restored after. Images of more than ``max_image_pixels`` pixels (default PIL's limit) are
    refused. Overlays (and uncertainty PNGs) are drawn for the first ``PICTURE_IMAGES``
    images only, unless ``all_pictures``; label maps for all. ``scheduler`` ("local",
    "local:N" or a dask scheduler address whose workers see the same files) predicts the
    images as dask tasks, with the same outputs. Returns the summary written to predict.json,
    with the output paths per image under "outputs".
    """
    started = time.perf_counter()
    check_scheduler(scheduler)  # before anything is written
    with use_threads(threads):
        dev = resolve_device(device)
        model = load_run(run, dev)
        vote, tile_rows = _settings(model, vote, tile_rows)
        _warn_if_stale(model)
        source_path = input_path(input)
        with reading_source(source_path):
            images_dir = Path(images) if images else None
            source = open_source(source_path, model, dev, checkpoint, resize, images_dir,
                                 max_image_pixels, at_model_size)
            job = _Job(Path(out_dir), source, source_path, model, dev, vote, tile_rows,
                       uncertainty, data.resize_mode(resize), images_dir, started, progress,
                       None if all_pictures else PICTURE_IMAGES, scheduler,
                       max_image_pixels, at_model_size)
            summary = _predict_whole(job)
    log.info("predicted %d image(s) into %s (%.1f s)", summary["num_images"], job.out,
             summary["seconds"])
    return summary


def _settings(model: Ensemble, vote: str | None, tile_rows: int | None) -> tuple[str, int]:
    """The vote and tile rows to use (the run config's by default), and the run checked."""
    cfg = model.config
    vote = voting.check_vote(vote or cfg.predict.vote)
    tile_rows = int(tile_rows or cfg.predict.tile_rows)
    if tile_rows < 1:
        raise ConfigError(f"tile_rows must be >= 1, got {tile_rows}", "pass `tile_rows=32`")
    if not model.members:
        raise RunError("the run has no trained members", "run `ddpmseg fit` to train them")
    info = model.info
    if info.num_classes > 256:
        raise RunError(f"the run has {info.num_classes} classes; label maps hold at most 256",
                       "use at most 256 classes")
    return vote, tile_rows


@dataclass(frozen=True)
class _Job:
    """One prediction: what is predicted, how, and where it goes."""
    out: Path                  # OUT as given (the paths predict.json records)
    source: object             # open_source's
    source_path: Path | str   # a URL stays a string
    model: Ensemble
    device: torch.device
    vote: str
    tile_rows: int
    uncertainty: bool
    resize: str | None         # data.resize_mode's
    images_dir: Path | None
    started: float             # time.perf_counter() at the start
    progress: bool
    pictures: int | None = None    # images (the first ones) with pictures; None: all
    scheduler: str | None = None   # dask, or None: this process
    max_image_pixels: int | None = None
    at_model_size: bool = False


def _predict_whole(job: _Job) -> dict:
    """Predict into a hidden sibling of OUT, under OUT's lock, and swap it in whole: until
    then OUT keeps its earlier prediction, whatever stops this run (``outputs.folder``)."""
    out = job.out
    created = not out.exists()
    real = _check_out(out)
    # One predict at a time per OUT (the lock file is OUT's hidden sibling).
    with writer_lock(out, "prediction folder"):
        folder.finish_interrupted(real)  # what a killed predict left beside OUT
        folder.check_free(real, job.source.names)  # OUT = the data folder: not ours
        stage = folder.staging_dir(real)
        stage.mkdir()
        try:
            summary = _predict_into(job, stage)
            folder.publish(stage, real)
        except BaseException as exc:
            written = folder.folder_bytes(stage)
            shutil.rmtree(stage, ignore_errors=True)  # OUT is untouched
            if created:
                _remove_if_empty(real)
            if is_no_space(exc):
                raise no_space_error(out, None, "the prediction", hint=(
                    f"free some space, or choose an OUT on another disk, and rerun; the "
                    f"earlier prediction in it is unchanged ({size_text(written)} of the new "
                    f"one were written)")) from exc
            raise
    return summary


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty: the swap happened, or something was put there meanwhile
        pass


def _check_out(out: Path) -> Path:
    """OUT's real path, after checking that it is a folder predict can replace; made here
    when new, so that an OSError (a file in the way, no permission) names OUT."""
    out.mkdir(parents=True, exist_ok=True)
    real = folder.real_out(out)
    folder.check_replaceable(real)
    return real


def _predict_into(job: _Job, stage: Path) -> dict:
    """Write the whole prediction into ``stage``; the paths it records are OUT's."""
    info, model, out = job.model.info, job.model, job.out
    class_names = render.class_names(info.class_names, model.config.data.class_names)
    palette = render.make_palette(info.num_classes, info.ignore_label)
    write_json(stage / folder.PALETTE_FILE, render.palette_json(
        palette, info.num_classes, info.ignore_label, class_names))

    outputs: dict[str, dict] = {}
    sheet_rows = []
    _say_pictures(job)
    results = _scheduled(job, stage) if job.scheduler else _predicted(job, stage)
    items = bar(results, total=len(job.source), desc="predict", unit="img",
                progress=job.progress, leave=False)
    for name, files, row in items:
        outputs[name] = {k: str(out / Path(v).name) for k, v in files.items()}
        if row is not None:
            sheet_rows.append(row)
    items.close()
    if sheet_rows:
        render.contact_sheet(sheet_rows, palette, class_names, info.num_classes).save(
            stage / folder.SUMMARY_FILE)
    summary = _meta(job, class_names, list(outputs), bool(sheet_rows))
    folder.write_meta(stage, summary)  # last: the prediction is whole
    return {**summary, "outputs": outputs}


def _say_pictures(job: _Job) -> None:
    """One line when some images get no pictures."""
    total = len(job.source)
    if job.pictures is not None and total > job.pictures:
        log.info("overlays%s for the first %d of %d images only, label maps for all "
                 "(`all_pictures=True` draws them all)",
                 " and uncertainty pictures" if job.uncertainty else "", job.pictures, total)


def _predict_items(model: Ensemble, source, items, stage: Path, settings: tuple,
                   wanted: Collection[int] | None = None) -> Iterator[tuple]:
    """(name, files, contact sheet row or None) of each item, its files written into
    ``stage``; ``settings``: (vote, tile_rows, uncertainty, device, pictures)."""
    vote, tile_rows, uncertainty, device, pictures = settings
    class_names = render.class_names(model.info.class_names, model.config.data.class_names)
    palette = render.make_palette(model.info.num_classes, model.info.ignore_label)
    position = {n: k for k, n in enumerate(source.names)}
    for item in items:
        k = position[item.name]
        pred = predict_item(model.members, item.views, source.size, item.layout, vote=vote,
                            tile_rows=tile_rows, uncertainty=uncertainty, device=device)
        item.views = None
        files, row = _write_image_outputs(stage, item, pred, palette, model, class_names,
                                          uncertainty, pictures is None or k < pictures)
        yield item.name, files, row if k < SUMMARY_IMAGES else None


def _predicted(job: _Job, stage: Path) -> Iterator[tuple]:
    """``_predict_items`` of every image, in this process."""
    settings = (job.vote, job.tile_rows, job.uncertainty, job.device, job.pictures)
    return _predict_items(job.model, job.source, job.source.items(), stage, settings)


# -- on dask ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opening:
    """What a dask worker opens to predict (a run and its input), every path absolute."""
    run: str
    input: str
    device: str
    checkpoint: str | None
    resize: bool | str | None
    images: str | None
    max_image_pixels: int | None
    at_model_size: bool = True

    @classmethod
    def of(cls, model: Ensemble, source, source_path: Path | str, device,
           resize: bool | str | None, images_dir: Path | None, max_image_pixels: int | None,
           *, at_model_size: bool = True) -> "Opening":
        if model.run_dir is None:
            raise ConfigError("a scheduler needs the run's directory: each worker loads the "
                              "run itself", "give the run directory, not a loaded ensemble")
        checkpoint = getattr(source, "checkpoint", None)
        return cls(absolute(model.run_dir), absolute(source_path), str(device),
                   absolute(checkpoint) if checkpoint else None, resize,
                   absolute(images_dir) if images_dir else None, max_image_pixels,
                   at_model_size)

    def open(self) -> tuple[Ensemble, object]:
        """(the run, its source) on this worker: the ones its last task opened when alike."""
        for path, what in ((self.run, "the run"), (self.input, "the input")):
            worker_must_see(path, what)

        def make():
            dev = resolve_device(self.device)
            model = load_run(self.run, dev)
            images = Path(self.images) if self.images else None
            given = self.input if is_url(self.input) else Path(self.input)
            return model, open_source(given, model, dev, self.checkpoint, self.resize, images,
                                      self.max_image_pixels, self.at_model_size)
        return opened(("predict", self), make)


def only(source, names: Collection[str]) -> Iterator[_Item]:
    """The items of ``source`` named in ``names``, in the source's order."""
    keep = set(names)
    # A set: a list made each task O(pool x pool) (0.66 s a task at 10k images, 10 s at 40k).
    return source.items(skip={n for n in source.names if n not in keep})


def _predict_chunk(setup: tuple, names: list[str]) -> list[tuple]:
    """A dask task: ``_predict_items`` of ``names``; setup: (Opening, stage, settings)."""
    opening, stage, settings = setup
    model, source = opening.open()
    settings = (*settings[:3], torch.device(settings[3]), settings[4])
    return list(_predict_items(model, source, only(source, names), Path(stage), settings))


def _scheduled(job: _Job, stage: Path) -> Iterator[tuple]:
    """``_predicted``'s results, computed as dask tasks on ``job.scheduler``."""
    opening = Opening.of(job.model, job.source, job.source_path, job.device, job.resize,
                         job.images_dir, job.max_image_pixels,
                         at_model_size=job.at_model_size)
    settings = (job.vote, job.tile_rows, job.uncertainty, str(job.device), job.pictures)
    return spread.in_order(job.scheduler, _predict_chunk, (opening, absolute(stage), settings),
                           job.source.names, name="predict",
                           doing=f"predicting into {job.out}")


def _meta(job: _Job, class_names: tuple, names: list[str], sheet: bool) -> dict:
    """predict.json's contents (``folder.META_KEYS``)."""
    model, source, out = job.model, job.source, job.out
    info = model.info
    return {
        "version": __version__,
        "run": str(model.run_dir) if model.run_dir is not None else None,
        "input": str(job.source_path),
        "input_kind": source.kind,
        "out_dir": str(out),
        "vote": job.vote,
        "tile_rows": job.tile_rows,
        "uncertainty": job.uncertainty,
        "device": str(job.device),
        "resize": job.resize or False,
        "at_model_size": job.at_model_size,
        "images": str(job.images_dir) if job.images_dir else None,
        "checkpoint": str(source.checkpoint) if source.kind == "images" else None,
        "num_members": len(model.members),
        "num_classes": info.num_classes,
        "ignore_label": info.ignore_label,
        "class_names": list(class_names),
        "steps": list(info.steps),
        "blocks": list(info.blocks),
        "image_size": list(source.size),
        "seed": info.seed,
        "dtype": info.dtype,
        "fingerprint": info.fingerprint,
        # The run's resolved config: what a report shows of the run (backbone, ETF, ...).
        "config": model.config.to_dict(),
        "num_images": len(names),
        "names": names,
        "summary": str(out / folder.SUMMARY_FILE) if sheet else None,
        "palette": str(out / folder.PALETTE_FILE),
        "seconds": round(time.perf_counter() - job.started, 3),
    }

"""Reading a user's data folder: images (png/jpg/webp/bmp/tif) with optional masks of the
same stem.

Masks are ``.npy`` class-index arrays or single-channel (grey or palette) PNGs, under the names
of ``mask_names`` (quoted to users as ``ACCEPTED_MASKS``). Every image and PNG mask is read by
``decode``: the pixel limit checked from the header, then its EXIF orientation applied, so
that ddpmseg sees what a viewer shows. Every problem is reported as our own error naming the
file, before anything is written.

The pixel limit is a parameter, ``max_image_pixels`` (None: PIL's default, 89478485), of every
function here that reads an image, and of the library commands that read them; nothing sets it
globally. Masks are resized by ``resize_mask`` (nearest neighbour) and their labels checked by
``check_labels``, everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpmseg.core.errors import BadInputError, InputNotFoundError
from ddpmseg.spec import DEFAULT_RESIZE, RESIZE_MODES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".npy", ".png")
# A PNG holds class indices when it has one channel: 1-bit, grey, palette or 16/32-bit grey.
MASK_PNG_MODES = ("1", "L", "P", "I", "I;16")


def mask_names(stem: str) -> tuple[str, ...]:
    """The file names a mask of image ``<stem>`` may have, in the order they are looked for
    (besides a single-channel ``<stem>.png`` when the image itself is not that PNG)."""
    return (f"{stem}.npy", f"{stem}_mask.png", f"{stem}_mask.npy")


# The accepted mask names as notes and errors quote them.
ACCEPTED_MASKS = (", ".join(mask_names("<id>"))
                  + ", or a grey/palette <id>.png beside a <id>.jpg")
# Formats whose compression changes pixel values: a label at a class edge becomes another.
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")
# Name endings other tools give masks: such a file is a mask under another name, not an image.
MASK_LIKE_ENDINGS = ("_mask", "_masks", "_label", "_labels", "_lbl", "_gt", "_seg",
                     "_segmentation", "_annotation", "_annotations", "_anno")


def is_mask_png(path: Path, max_image_pixels: int | None = None) -> bool:
    """Whether the PNG at ``path`` can be a mask (a single-channel image). A file that cannot
    be read, or has too many pixels, is an error naming it: "no mask" would point elsewhere."""
    return _image_mode(path, max_image_pixels) in MASK_PNG_MODES


def _image_mode(path: Path, max_image_pixels: int | None = None) -> str:
    with _open(path, max_image_pixels) as im:  # the header only
        return im.mode


def lossy_mask_error(path: Path) -> BadInputError:
    return BadInputError(
        f"mask {path} is a lossy {path.suffix.lstrip('.').upper()} file: lossy compression "
        "changes label values at the edges between classes",
        f"save masks losslessly as {ACCEPTED_MASKS} (export them again from the labelling "
        "tool rather than converting this file)")


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    mask: Path | None


def list_samples(folder: str | Path, require_masks: bool = False,
                 max_image_pixels: int | None = None) -> list[Sample]:
    """Images of ``folder`` sorted by name, each with its mask when one exists.

    A ``<stem>.png`` next to a ``<stem>.npy`` is the image; a PNG mask needs the image to be a
    JPEG or the mask to be named ``<stem>_mask.png``. A file that looks like a mask under
    another name (``mask_like``) is named in a note and left out, never read as an image; a
    lossy one is an error. Masks without an image are named in a note.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"data folder {folder} does not exist", "check the path")
    files = _files_by_name(folder)
    candidates = [p for p in files.values() if p.suffix.lower() in IMAGE_SUFFIXES
                  and not _is_accepted_mask(p, files)]
    images = {p.stem: p for p in candidates}
    skipped = [p.name for p in files.values()
               if p.suffix.lower() not in IMAGE_SUFFIXES + (".npy",)
               and not p.name.startswith(".")]
    samples, other_names = [], []
    for path in candidates:
        if mask_like(path, images, max_image_pixels):
            if path.suffix.lower() in LOSSY_SUFFIXES:
                raise lossy_mask_error(path)
            other_names.append(path.name)
            continue
        mask = _find_mask(path, files)
        if require_masks and mask is None:
            raise BadInputError(f"image {path} has no mask ({ACCEPTED_MASKS})",
                                "add its mask or move the image out of the training folder")
        samples.append(Sample(path.stem, path, mask))
    if skipped:  # never silently: a user's .gif or .heic would otherwise just vanish
        log.warning("note: %d file(s) in %s are not images (%s) and were skipped: %s",
                    len(skipped), folder, "/".join(s[1:] for s in IMAGE_SUFFIXES),
                    _some(skipped))
    if other_names:
        log.warning("note: %d file(s) in %s look like masks under another name and were not "
                    "used, as images or as masks: %s (accepted mask names: %s)",
                    len(other_names), folder, _some(other_names), ACCEPTED_MASKS)
    _note_stray_masks(folder, files, {s.name for s in samples})
    if not samples:
        raise InputNotFoundError(f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in "
                                 f"{folder}", "point to a folder of images")
    return samples


def _files_by_name(folder: Path) -> dict[str, Path]:
    """The files of ``folder`` by name, in name order (the order of sorted paths in one
    folder). Names are sorted as strings and entries typed by ``os.scandir``, without a stat
    each: a 10,000-image folder lists in a fraction of the time that sorting Paths takes."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file())
    return {name: folder / name for name in names}


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _is_accepted_mask(path: Path, files: dict) -> bool:
    """Whether the image file ``path`` has an accepted mask name, so it is no image."""
    return bool(_mask_owners(path.name)) or (path.suffix.lower() == ".png"
                                             and _is_mask_png(path, files))


def mask_like(path: Path, images: dict[str, Path], max_image_pixels: int | None = None) -> bool:
    """Whether the image file ``path`` looks like a mask under a name ddpmseg does not accept:
    a mask-like ending (``MASK_LIKE_ENDINGS``) after another image's stem, or on a
    single-channel file; or a single-channel file named after a colour image plus a suffix
    (``img1_cls.png`` beside ``img1.jpg``). Grey images beside grey images stay images."""
    stem = path.stem
    ending = next((e for e in MASK_LIKE_ENDINGS if stem.lower().endswith(e)), None)
    if ending is not None and stem[:-len(ending)] in images:
        return True
    bases = [images[b] for b in _prefixes(stem) if b in images]
    if ending is None and not bases:
        return False  # cheap exit: most images are named after no other image
    if _image_mode(path, max_image_pixels) not in MASK_PNG_MODES:
        return False
    return ending is not None or any(_image_mode(b, max_image_pixels) not in MASK_PNG_MODES
                                     for b in bases)


def _prefixes(stem: str) -> list[str]:
    # "a_b-c" -> "a_b", "a": the stems it would extend with a separator and a suffix.
    return [stem[:i] for i in range(len(stem) - 1, 0, -1) if stem[i] in "_-."]


def _note_stray_masks(folder: Path, files: dict, names: set[str]) -> None:
    stray = []
    for path in files.values():  # in name order
        owners = _mask_owners(path.name)
        if owners and not any(o in names for o in owners):
            stray.append(path.name)
    if stray:
        log.warning("note: %d mask file(s) in %s have no image of the same stem and were not "
                    "used: %s (accepted mask names: %s)", len(stray), folder, _some(stray),
                    ACCEPTED_MASKS)


def _mask_owners(name: str) -> list[str]:
    """The image stems whose mask a file called ``name`` is by ``mask_names`` (none: not a
    mask name): ``a_mask.npy`` -> ``a_mask``, ``a``."""
    tails = [pattern[1:] for pattern in mask_names("\0")]  # ".npy", "_mask.png", ...
    return [name[:-len(t)] for t in tails if name.endswith(t) and len(name) > len(t)]


def find_image(folder: Path, name: str) -> Path | None:
    """``folder/<name>.png`` (or .jpg, .jpeg, upper case too) when it exists."""
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _is_mask_png(path: Path, files: dict) -> bool:
    # <stem>.png is a mask only when a non-PNG image (JPEG, WebP, ...) of that stem sits beside it.
    stem = path.stem
    return any(f"{stem}{s}" in files for s in _NOT_PNG_CASES)


_NOT_PNG = tuple(s for s in IMAGE_SUFFIXES if s != ".png")
_NOT_PNG_CASES = _NOT_PNG + tuple(x.upper() for x in _NOT_PNG)


def _find_mask(image: Path, files: dict) -> Path | None:
    for name in mask_names(image.stem):
        if name in files:
            return files[name]
    if image.suffix.lower() in _NOT_PNG and f"{image.stem}.png" in files:
        return files[f"{image.stem}.png"]
    return None


def size_text(hw: tuple[int, int]) -> str:
    """An (H, W) size as users read sizes, width first: ``640x480``, as image tools write."""
    return f"{hw[1]}x{hw[0]}"


def unreadable(path: Path, exc: BaseException, what: str = "image") -> BadInputError:
    """The one error for an image or mask file that cannot be decoded (unknown format,
    truncated or damaged data)."""
    return BadInputError(f"cannot read {what} {path} ({exc})", "replace or remove the file")


# PIL refuses files above twice its own (global) limit inside Image.open, before we see their
# size. A caller's higher limit lifts PIL's for the length of one open, under this lock; PIL's
# limit is read under it too, so no other thread takes the lifted value for its own.
_PIL_LIMIT_LOCK = threading.Lock()


def pixel_limit(max_image_pixels: int | None = None) -> int | None:
    """The limit in force: ``max_image_pixels``, else PIL's default (None: no limit)."""
    if max_image_pixels is not None:
        return int(max_image_pixels)
    with _PIL_LIMIT_LOCK:
        return Image.MAX_IMAGE_PIXELS


@contextlib.contextmanager
def _pil_refuses_above(limit: int | None):
    if Image.MAX_IMAGE_PIXELS is not None and (limit is None or limit > Image.MAX_IMAGE_PIXELS):
        with _PIL_LIMIT_LOCK:
            before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = before
    else:
        yield


def _open(path: Path, max_image_pixels: int | None = None) -> Image.Image:
    """The file opened lazily (its header read, no pixels decoded), refused when it has more
    pixels than the limit (``max_image_pixels``); the one place ddpmseg opens images."""
    limit = pixel_limit(max_image_pixels)
    try:
        with warnings.catch_warnings(), _pil_refuses_above(limit):
            # PIL warns between its limit and twice that: our own check below refuses those.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:  # more than twice PIL's limit
        raise too_many_pixels(path, limit=limit) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise unreadable(path, exc) from exc
    if limit is not None and im.size[0] * im.size[1] > limit:
        im.close()
        raise too_many_pixels(path, (im.size[1], im.size[0]), limit)
    return im


def decode(path: Path, max_image_pixels: int | None = None) -> Image.Image:
    """The image or PNG mask at ``path``, decoded and turned as its EXIF orientation says
    (``ImageOps.exif_transpose``): a phone photo stored sideways comes out as viewers show it.
    Every image and PNG mask ddpmseg reads comes through here; one of more than
    ``max_image_pixels`` pixels (default PIL's limit) is refused from its header."""
    with _open(path, max_image_pixels) as im:
        try:
            return ImageOps.exif_transpose(im)  # decodes; a copy that outlives the file
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or damaged data
            raise unreadable(path, exc) from exc


def image_hw(path: Path, max_image_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an image as shown (EXIF orientation applied), decoded in full: a truncated
    file fails here, before anything is written, not halfway through a run."""
    return decode(path, max_image_pixels).size[::-1]


def check_image_size(path: Path, hw: tuple[int, int], size: tuple[int, int],
                     resize: bool | str) -> None:
    """An image of (H, W) ``hw`` against the model's ``size``: another size is an error
    unless ``resize`` (a mode of ``RESIZE_MODES``, or True for the default); a stretch that
    changes the aspect ratio gets a note (once: call this where inputs are checked, not where
    they are loaded)."""
    if tuple(hw) == tuple(size):
        return
    mode = resize_mode(resize)
    if mode is None:
        raise BadInputError(f"image {path} is {size_text(hw)} but the model takes "
                            f"{size_text(size)}", "pass `resize=True` to resize images (and masks)")
    if mode == "stretch" and abs(hw[1] * size[0] - hw[0] * size[1]) > max(size) * max(hw) // 100:
        log.warning("note: %s is %s; `resize=stretch` stretches it to %s (aspect ratio "
                    "not kept; `resize=pad` keeps it)", path, size_text(hw),
                    size_text(size))


def load_image(path: Path, size: tuple[int, int] | None = None, resize: bool = False,
               max_image_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) as shown. ``size`` is (H, W); another size is an error unless
    ``resize`` (the stretch note is ``check_image_size``'s, given where inputs are checked)."""
    im = decode(path, max_image_pixels)
    if im.mode in WIDE_MODES:
        im = _wide_to_rgb(im)
    elif im.mode != "RGB":
        log.info("note: %s is %s, converted to RGB", path, im.mode)
        im = im.convert("RGB")
    hw = (im.size[1], im.size[0])
    if size is not None and hw != tuple(size):
        if not resize:
            check_image_size(path, hw, size, resize)  # raises
        if resize_mode(resize) != "stretch":
            # One model-size picture: pad's letterbox (tiles' callers use ``fit_image``; a
            # single picture of a tiled image is its letterbox too).
            return fit_image(np.asarray(im, dtype=np.uint8), layout(hw, size, "pad"))[0]
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8).copy()


# -- images of another size than the model's --------------------------------------------------
# stretch: resized to the model's square (aspect lost); pad: scaled to fit and letterboxed,
# the border grey and its labels the ignore label; tiles: overlapping model-size windows of
# the image at its own resolution (padded up where a side is shorter than the model's).
# The letterbox border: mid grey, 0 in the model's [-1, 1] input range.
PAD_VALUE = 128


def resize_mode(resize: bool | str | None) -> str | None:
    """The mode a ``resize`` argument means: None (no resizing) for False/None, the default
    for True, else the mode named (``RESIZE_MODES``)."""
    if resize is None or resize is False:
        return None
    if resize is True:
        return DEFAULT_RESIZE
    if resize not in RESIZE_MODES:
        raise BadInputError(f"unknown resize mode {resize!r}",
                            f"pass `resize=` one of {', '.join(RESIZE_MODES)} (or True: "
                            f"{DEFAULT_RESIZE})")
    return str(resize)


@dataclass(frozen=True)
class Layout:
    """How an image of ``hw`` (H, W as shown) becomes model-size inputs of ``size``, and where
    their results go back. ``mode`` is "same" when the image is the model's size."""
    hw: tuple[int, int]
    size: tuple[int, int]
    mode: str

    @property
    def inner(self) -> tuple[int, int, int, int]:
        """(top, left, height, width): the image's part of a model-size input (not tiles)."""
        (h, w), (sh, sw) = self.hw, self.size
        if self.mode != "pad":
            return (0, 0, sh, sw)
        scale = min(sh / h, sw / w)
        ih, iw = max(1, min(sh, round(h * scale))), max(1, min(sw, round(w * scale)))
        return ((sh - ih) // 2, (sw - iw) // 2, ih, iw)

    @property
    def padded(self) -> tuple[int, int]:
        """Tiles: the image's size once its shorter-than-the-model sides are padded up."""
        return (max(self.hw[0], self.size[0]), max(self.hw[1], self.size[1]))

    def windows(self) -> list[tuple[int, int]]:
        """Tiles: the (y, x) origins of the overlapping windows (stride 3/4 of the model's
        side, the last one flush with the edge); [(0, 0)] otherwise."""
        if self.mode != "tiles":
            return [(0, 0)]
        return [(y, x) for y in _starts(self.padded[0], self.size[0])
                for x in _starts(self.padded[1], self.size[1])]


def _starts(length: int, window: int) -> list[int]:
    stride = max(1, window * 3 // 4)
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def layout(hw: tuple[int, int], size: tuple[int, int], resize: bool | str) -> Layout:
    """The ``Layout`` of an image of ``hw`` for a model of ``size`` under ``resize``."""
    hw, size = (int(hw[0]), int(hw[1])), (int(size[0]), int(size[1]))
    mode = resize_mode(resize) if hw != size else "same"
    if mode is None:
        raise BadInputError(f"an image is {size_text(hw)} but the model takes {size_text(size)}",
                            "pass `resize=True` to resize images (and masks)")
    return Layout(hw, size, mode)


def fit_image(image: np.ndarray, lay: Layout) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) -> the model-size inputs of ``lay`` (one; tiles: one per window)."""
    sh, sw = lay.size
    if lay.mode == "same":
        return [np.ascontiguousarray(image)]
    if lay.mode == "stretch":
        return [np.array(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))]
    if lay.mode == "pad":
        top, left, ih, iw = lay.inner
        out = np.full((sh, sw, 3), PAD_VALUE, dtype=np.uint8)
        out[top:top + ih, left:left + iw] = np.asarray(
            Image.fromarray(image).resize((iw, ih), Image.BILINEAR))
        return [out]
    big = np.full(lay.padded + (3,), PAD_VALUE, dtype=np.uint8)
    big[:lay.hw[0], :lay.hw[1]] = image
    return [np.ascontiguousarray(big[y:y + sh, x:x + sw]) for y, x in lay.windows()]


def fit_mask(mask: np.ndarray, lay: Layout, ignore_label: int) -> list[np.ndarray]:
    """A mask of the image's size -> the label maps of ``fit_image``'s inputs: nearest
    neighbour, and the ignore label wherever an input shows no image (padding)."""
    sh, sw = lay.size
    if lay.mode == "same":
        return [mask]
    if lay.mode == "stretch":
        return [resize_mask(mask, lay.size)]
    if lay.mode == "pad":
        top, left, ih, iw = lay.inner
        out = np.full((sh, sw), ignore_label, dtype=np.uint8)
        out[top:top + ih, left:left + iw] = resize_mask(mask, (ih, iw))
        return [out]
    big = np.full(lay.padded, ignore_label, dtype=np.uint8)
    big[:lay.hw[0], :lay.hw[1]] = mask
    return [np.ascontiguousarray(big[y:y + sh, x:x + sw]) for y, x in lay.windows()]


# Grey images of more than 8 bits: PIL's convert("RGB") clips them at 255 (a 16-bit image
# becomes almost all white), so they are scaled from their full range instead.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    # Mode "I" is how PIL opens 16-bit PNGs (8-bit greys open as "L"): its range is 16 bits.
    a = np.asarray(im).astype(np.float64)
    grey = np.clip(np.rint(a * (255.0 / WIDE_MODES[im.mode])), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


def too_many_pixels(path: Path, hw: tuple[int, int] | None = None,
                    limit: int | None = None) -> BadInputError:
    # Without hw PIL refused the file itself, above twice the limit, before telling its size.
    limit = pixel_limit(limit)
    what = (f"is {size_text(hw)} = {hw[0] * hw[1]} pixels" if hw is not None
            else f"has more than {2 * limit} pixels")
    return BadInputError(f"image {path} {what}, above the limit of {limit} pixels "
                         f"(`max_image_pixels={limit}`, a guard against decompression bombs)",
                         "if the file is trusted, raise the limit with `max_image_pixels=N`")


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) class indices resized to ``size`` (H, W) by nearest neighbour: labels are
    never blended. Every mask ddpmseg resizes (extract, evaluate) goes through here."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    return np.asarray(im.resize((size[1], size[0]), Image.NEAREST), dtype=np.uint8).copy()


def load_mask(path: Path, size: tuple[int, int], resize: bool = False,
              hint: str = "fix the mask or pass `resize=True`",
              max_image_pixels: int | None = None) -> np.ndarray:
    """Class indices uint8 (H, W) from ``.npy`` or a grey/palette PNG, checked against ``size``
    (``hint``: how to fix a size mismatch, for the command at hand)."""
    mask = read_mask(path, max_image_pixels)
    if mask.shape != tuple(size):
        if not resize:
            raise BadInputError(f"mask {path} is {size_text(mask.shape)} but its image is "
                                f"{size_text(size)}", hint)
        mask = resize_mask(mask, size)
    return mask


def read_mask(path: Path, max_image_pixels: int | None = None) -> np.ndarray:
    """Class indices uint8 (H, W) from ``.npy`` or a single-channel PNG (MASK_PNG_MODES)."""
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in LOSSY_SUFFIXES:
            raise lossy_mask_error(path)
        else:
            im = decode(path, max_image_pixels)  # a mask turned as its image is, by its EXIF orientation
            if im.mode not in MASK_PNG_MODES:
                raise BadInputError(f"mask {path} is a {im.mode} image",
                                    "masks must be class indices: a grey or palette PNG or .npy")
            mask = np.asarray(im)
    except BadInputError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise unreadable(path, exc, "mask") from exc
    if mask.ndim == 3 and mask.shape[-1] == 1:  # (H, W, 1); never squeeze 1xW or 1x1
        mask = mask[..., 0]
    if mask.dtype == np.bool_:  # a binary mask (bool .npy or a 1-bit PNG): classes 0 and 1
        mask = mask.astype(np.uint8)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise BadInputError(f"mask {path} is not a 2-D integer array (shape {mask.shape}, "
                            f"{mask.dtype})", "save masks as H x W class indices")
    if mask.min() < 0 or mask.max() > 255:
        raise BadInputError(f"mask {path} has labels outside 0..255", "use uint8 class indices")
    return mask.astype(np.uint8)


def check_labels(mask: np.ndarray, num_classes: int, ignore_label: int, path: Path,
                 what: str = "mask") -> None:
    """Every label a class index or the ignore label; else an error saying how many pixels are
    out of range, and (for a mask) blaming lossy compression when they are few and along class
    edges. ``what`` names the file's kind: "mask", or "prediction" for a predicted label map."""
    allowed = np.zeros(256, bool)
    allowed[:num_classes] = True
    allowed[ignore_label] = True
    bad = ~allowed[mask]
    if not bad.any():
        return
    labels = np.unique(mask[bad]).tolist()
    message = (f"{what} {path} has labels {labels} outside 0..{num_classes - 1} (ignore label "
               f"{ignore_label}) on {int(bad.sum())} of {mask.size} pixels")
    count_hint = "give `num_classes=N` (data.num_classes) or a config with the right class count"
    if what == "mask" and _looks_lossy(mask, bad):
        raise BadInputError(message, "they lie scattered along class edges, as lossy compression "
                                  "(JPEG, WebP) leaves them: export the mask again losslessly "
                                  f"({ACCEPTED_MASKS}); if they are real classes, {count_hint}")
    raise BadInputError(message, count_hint)


def _looks_lossy(mask: np.ndarray, bad: np.ndarray) -> bool:
    # JPEG rings at class edges: a few stray values, most beside a pixel of another label. A
    # real class beyond the count fills regions instead, whose pixels mostly have like
    # neighbours.
    if bad.sum() > 0.05 * mask.size:
        return False
    edge = np.zeros_like(bad)
    for axis in (0, 1):
        step = np.diff(mask, axis=axis) != 0
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= step
        edge[tuple(hi)] |= step
    return (edge & bad).sum() > 0.5 * bad.sum()


def labelled(mask: np.ndarray, ignore_label: int) -> bool:
    """Whether ``mask`` labels at least one pixel (a mask of only the ignore label does not:
    its image counts as unlabelled)."""
    return bool((mask != ignore_label).any())


def drop_rare_classes(mask: np.ndarray, num_classes: int, ignore_label: int,
                      min_pixels: int = 20) -> np.ndarray:
    """The reference's rule: in one image, a class with 0 < pixels < min_pixels is ignored."""
    out = mask.copy()
    counts = np.bincount(mask.ravel(), minlength=256)
    for c in range(num_classes):
        if c != ignore_label and 0 < counts[c] < min_pixels:
            out[mask == c] = ignore_label
    return out

"""Reading a user's data folder: images (png/jpg/webp/bmp/tif) with optional masks of the
same stem.

Masks are ``.npy`` class-index arrays or single-channel (grey or palette) PNGs. Every problem
is reported as our own error naming the file, before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import BadInputError, InputNotFoundError

log = logging.getLogger("ddpmseg")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".npy", ".png")
# A PNG holds class indices when it has one channel: 1-bit, grey, palette or 16/32-bit grey.
MASK_PNG_MODES = ("1", "L", "P", "I", "I;16")


def mask_names(stem: str) -> tuple[str, ...]:
    """The file names a mask of image ``<stem>`` may have, in the order they are looked for
    (besides a single-channel ``<stem>.png`` when the image itself is not that PNG)."""
    return (f"{stem}.npy", f"{stem}_mask.png", f"{stem}_mask.npy")


def is_mask_png(path: Path) -> bool:
    """Whether the PNG at ``path`` can be a mask (a single-channel image)."""
    try:
        with Image.open(path) as im:
            return im.mode in MASK_PNG_MODES
    except (OSError, UnidentifiedImageError):
        return False


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    mask: Path | None


def list_samples(folder: str | Path, require_masks: bool = False) -> list[Sample]:
    """Images of ``folder`` sorted by name, each with its mask when one exists.

    A ``<stem>.png`` next to a ``<stem>.npy`` is the image; a PNG mask needs the image to be a
    JPEG or the mask to be named ``<stem>_mask.png``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"data folder {folder} does not exist", "check the path")
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    samples = []
    skipped = []
    for path in sorted(files.values()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() != ".npy" and not path.name.startswith("."):
                skipped.append(path.name)
            continue
        if path.stem.endswith("_mask"):
            continue
        if path.suffix.lower() == ".png" and _is_mask_png(path, files):
            continue
        mask = _find_mask(path, files)
        if require_masks and mask is None:
            raise BadInputError(f"image {path} has no mask ({path.stem}.npy or {path.stem}_mask.png)",
                                "add its mask or move the image out of the training folder")
        samples.append(Sample(path.stem, path, mask))
    if skipped:  # never silently: a user's .gif or .heic would otherwise just vanish
        log.warning("note: %d file(s) in %s are not images (%s) and were skipped: %s",
                    len(skipped), folder, "/".join(s[1:] for s in IMAGE_SUFFIXES),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    if not samples:
        raise InputNotFoundError(f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in "
                                 f"{folder}", "point to a folder of images")
    return samples


def find_image(folder: Path, name: str) -> Path | None:
    """``folder/<name>.png`` (or .jpg, .jpeg, upper case too) when it exists."""
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _is_mask_png(path: Path, files: dict) -> bool:
    # <stem>.png is a mask only when a non-PNG image (JPEG, WebP, ...) of that stem sits beside it.
    return any(f"{path.stem}{s}" in files for s in _NOT_PNG + tuple(x.upper() for x in _NOT_PNG))


_NOT_PNG = tuple(s for s in IMAGE_SUFFIXES if s != ".png")


def _find_mask(image: Path, files: dict) -> Path | None:
    for name in mask_names(image.stem):
        if name in files:
            return files[name]
    if image.suffix.lower() in _NOT_PNG and f"{image.stem}.png" in files:
        return files[f"{image.stem}.png"]
    return None


def load_image(path: Path, size: tuple[int, int] | None = None, resize: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3). ``size`` is (H, W); another size is an error unless ``resize``."""
    try:
        with Image.open(path) as im:
            if im.mode in WIDE_MODES:
                im = _wide_to_rgb(im)
            elif im.mode != "RGB":
                log.info("note: %s is %s, converted to RGB", path, im.mode)
                im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                if not resize:
                    raise BadInputError(
                        f"image {path} is {im.size[1]}x{im.size[0]} but the model takes "
                        f"{size[0]}x{size[1]}", "pass --resize to resize images (and masks)")
                if abs(im.size[0] * size[0] - im.size[1] * size[1]) > max(size) * max(im.size) // 100:
                    log.warning("note: %s is %dx%d; --resize stretches it to %dx%d (aspect ratio "
                                "not kept; crop or pad it first to avoid that)", path,
                                im.size[1], im.size[0], size[0], size[1])
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except Image.DecompressionBombError as exc:
        raise too_many_pixels(path) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadInputError(f"cannot read image {path} ({exc})", "replace or remove the file") from exc


# Grey images of more than 8 bits: PIL's convert("RGB") clips them at 255 (a 16-bit image
# becomes almost all white), so they are scaled from their full range instead.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    # Mode "I" is how PIL opens 16-bit PNGs (8-bit greys open as "L"): its range is 16 bits.
    a = np.asarray(im).astype(np.float64)
    grey = np.clip(np.rint(a * (255.0 / WIDE_MODES[im.mode])), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")


def set_max_image_pixels(pixels: int | None) -> None:
    """Raise (or lower) PIL's decompression-bomb limit: images above it are refused."""
    if pixels is not None:
        Image.MAX_IMAGE_PIXELS = int(pixels)


def too_many_pixels(path: Path) -> BadInputError:
    return BadInputError(f"image {path} has more pixels than the limit of "
                         f"{Image.MAX_IMAGE_PIXELS} (a guard against decompression bombs)",
                         "if the file is trusted, raise the limit with --max-image-pixels N")


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], as the reference normalises.

    Contiguous: a permuted (channels-last) tensor sends the convolutions down another kernel
    whose results differ in the last float bits, so features would depend on how x0 was made.
    """
    return torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div(127.5).sub(1.0)


def load_mask(path: Path, size: tuple[int, int], resize: bool = False,
              hint: str = "fix the mask or pass --resize") -> np.ndarray:
    """Class indices uint8 (H, W) from ``.npy`` or a grey/palette PNG, checked against ``size``
    (``hint``: how to fix a size mismatch, for the command at hand)."""
    mask = read_mask(path)
    if mask.shape != tuple(size):
        if not resize:
            raise BadInputError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                                f"is {size[0]}x{size[1]}", hint)
        im = Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST)
        mask = np.asarray(im, dtype=np.uint8).copy()
    return mask


def read_mask(path: Path) -> np.ndarray:
    """Class indices uint8 (H, W) from ``.npy`` or a single-channel PNG (MASK_PNG_MODES)."""
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                if im.mode not in MASK_PNG_MODES:
                    raise BadInputError(f"mask {path} is a {im.mode} image",
                                        "masks must be class indices: a grey or palette PNG or .npy")
                mask = np.asarray(im)
    except BadInputError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise BadInputError(f"cannot read mask {path} ({exc})", "replace or remove the file") from exc
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


def check_labels(mask: np.ndarray, num_classes: int, ignore_label: int, path: Path) -> None:
    bad = np.setdiff1d(np.unique(mask), [*range(num_classes), ignore_label])
    if bad.size:
        raise BadInputError(f"mask {path} has labels {bad.tolist()} outside 0..{num_classes - 1} "
                            f"(ignore label {ignore_label})", "pass --num-classes N (data.num_classes) or a --config with the right class count")


def drop_rare_classes(mask: np.ndarray, num_classes: int, ignore_label: int,
                      min_pixels: int = 20) -> np.ndarray:
    """The reference's rule: in one image, a class with 0 < pixels < min_pixels is ignored."""
    out = mask.copy()
    counts = np.bincount(mask.ravel(), minlength=256)
    for c in range(num_classes):
        if c != ignore_label and 0 < counts[c] < min_pixels:
            out[mask == c] = ignore_label
    return out

"""The on-disk feature store: one Zarr (format 3) group per extraction.

Layout (see README, "How features are stored"):

    zarr.json                 attributes: StoreInfo (format version, fingerprint, steps, ...)
    act_t{t}_b{b}/            (N, C, h, w) native-resolution activation, one image per chunk
    labels/                   (N, H, W) uint8, after the reference's rare-class rule
    complete/                 (N,) uint8, 1 once every array of that image is written

An image is written array by array and flagged complete last, so a killed writer never leaves
a half-written image that reads as complete.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ..errors import StoreError, StoreMismatchError
from . import pixels

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class StoreInfo:
    """Everything a reader needs to interpret the arrays; saved as the group's attributes."""

    steps: tuple[int, ...]
    blocks: tuple[int, ...]
    shapes: tuple[tuple[int, int, int], ...]  # (C, h, w) per (step, block), feature order
    image_size: tuple[int, int]               # (H, W) of images and labels
    num_images: int
    names: tuple[str, ...]
    num_classes: int
    ignore_label: int
    class_names: tuple[str, ...] = ()
    has_labels: bool = True
    dtype: str = "float16"
    seed: int = 0
    fingerprint: dict = field(default_factory=dict)
    codec: dict = field(default_factory=lambda: {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"})
    format_version: int = FORMAT_VERSION

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(t, b) for t in self.steps for b in self.blocks]

    @property
    def feature_dim(self) -> int:
        return pixels.feature_dim(self.shapes)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, raw: dict) -> "StoreInfo":
        raw = dict(raw)
        for key in ("steps", "blocks", "image_size", "names", "class_names"):
            raw[key] = tuple(raw[key])
        raw["shapes"] = tuple(tuple(s) for s in raw["shapes"])
        return cls(**raw)


def array_name(t: int, b: int) -> str:
    return f"act_t{t}_b{b}"


def _codecs(codec: dict) -> list:
    shuffle = BloscShuffle[codec.get("shuffle", "bitshuffle")]
    blosc = BloscCodec(cname=codec.get("cname", "zstd"), clevel=codec.get("clevel", 3), shuffle=shuffle)
    # crc32c last: every chunk carries a checksum, so a flipped bit is an error, not a wrong value.
    return [blosc, Crc32cCodec()] if codec.get("cname") != "none" else [Crc32cCodec()]


class FeatureStore:
    """Reader (and low-level writer) of a feature store. Open with ``FeatureStore.open(path)``."""

    def __init__(self, group: zarr.Group, info: StoreInfo, path: str):
        self.group = group
        self.info = info
        self.path = path

    # -- creation and writing -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, info: StoreInfo, overwrite: bool = False) -> "FeatureStore":
        group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
        n = info.num_images
        codecs = _codecs(info.codec)
        for (t, b), (c, h, w) in zip(info.keys, info.shapes):
            group.create_array(array_name(t, b), shape=(n, c, h, w), chunks=(1, c, h, w),
                               dtype=DTYPES[info.dtype], compressors=codecs, fill_value=0)
        height, width = info.image_size
        group.create_array("labels", shape=(n, height, width), chunks=(1, height, width),
                           dtype=np.uint8, compressors=codecs, fill_value=info.ignore_label)
        group.create_array("complete", shape=(n,), chunks=(1,), dtype=np.uint8,
                           compressors=[Crc32cCodec()], fill_value=0)
        group.attrs["ddpmseg"] = info.to_json()
        return cls(group, info, str(path))

    def write_image(self, i: int, maps: list, labels: np.ndarray | None = None) -> None:
        """Write image i's maps (feature order) and labels, then flag it complete."""
        self.group["complete"][i] = 0
        for (t, b), m in zip(self.info.keys, maps):
            if isinstance(m, torch.Tensor):
                m = m.detach().cpu().numpy()
            self.group[array_name(t, b)][i] = m
        if labels is not None:
            self.group["labels"][i] = labels
        self.group["complete"][i] = 1

    # -- reading --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            raw = group.attrs["ddpmseg"]
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise StoreError(f"{path} is not a ddpmseg feature store",
                             "run `ddpmseg extract` to make one") from exc
        info = StoreInfo.from_json(raw)
        if info.format_version != FORMAT_VERSION:
            raise StoreMismatchError(f"{path} has store format {info.format_version}, this "
                                     f"ddpmseg reads {FORMAT_VERSION}", "re-extract the store")
        return cls(group, info, str(path))

    def __len__(self) -> int:
        return self.info.num_images

    @property
    def names(self) -> tuple[str, ...]:
        return self.info.names

    def complete(self) -> np.ndarray:
        return self.group["complete"][:].astype(bool)

    def labels(self, i: int) -> np.ndarray:
        return self.group["labels"][i]

    def maps(self, i: int) -> list[np.ndarray]:
        """Image i's native maps (C, h, w) in feature order, in the store's dtype."""
        return [self.group[array_name(t, b)][i] for t, b in self.info.keys]

    def pixel_features(self, i: int, ys, xs) -> torch.Tensor:
        return pixels.pixel_features(self.maps(i), self.info.image_size, ys, xs)

    def dense_rows(self, i: int, y0: int, y1: int) -> torch.Tensor:
        return pixels.dense_rows(self.maps(i), self.info.image_size, y0, y1)

"""The reference's pixel features, computed from native-resolution maps at chosen pixels only.

The reference upsamples every (step, block) map to the label size with
``F.interpolate(mode="bilinear", align_corners=False)`` and concatenates them step-major, then
block. Bilinear upsampling is separable and each output pixel reads at most a 2x2 neighbourhood,
so any pixel's feature can be computed from the small native maps without the dense tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def source_coords(out_size: int, in_size: int, idx: torch.Tensor):
    """Bilinear taps of output indices ``idx``: (lower index, upper index, weight of upper).

    Same arithmetic as PyTorch's align_corners=False kernel: src = (dst + 0.5) * in/out - 0.5,
    clamped at 0, so the weights agree to the last float.
    """
    scale = in_size / out_size
    src = ((idx.to(torch.float32) + 0.5) * scale - 0.5).clamp_(min=0.0)
    lo = src.to(torch.int64)
    hi = torch.clamp(lo + 1, max=in_size - 1)
    return lo, hi, src - lo.to(torch.float32)


def _as_tensor(m) -> torch.Tensor:
    return m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(m))


def pixel_features(maps: Sequence, size: tuple[int, int], ys, xs) -> torch.Tensor:
    """float32 (n, D): the dense feature of pixels (ys[k], xs[k]) of an image of ``size`` (H, W).

    ``maps`` are the (C, h, w) native maps in feature order (step-major, then block), as numpy
    arrays or tensors of any float dtype.
    """
    height, width = size
    ys = torch.as_tensor(ys, dtype=torch.int64)
    xs = torch.as_tensor(xs, dtype=torch.int64)
    out = []
    for m in maps:
        m = _as_tensor(m)
        _, h, w = m.shape
        y0, y1, ly = source_coords(height, h, ys)
        x0, x1, lx = source_coords(width, w, xs)
        ly, lx = ly.to(m.device), lx.to(m.device)
        top = m[:, y0, x0].float() * (1 - lx) + m[:, y0, x1].float() * lx
        bottom = m[:, y1, x0].float() * (1 - lx) + m[:, y1, x1].float() * lx
        out.append((top * (1 - ly) + bottom * ly).T)
    return torch.cat(out, dim=1)


def dense_rows(maps: Sequence, size: tuple[int, int], y0: int, y1: int) -> torch.Tensor:
    """float32 ((y1 - y0) * W, D): the features of every pixel of rows y0..y1-1, row-major."""
    width = size[1]
    ys = torch.arange(y0, y1).repeat_interleave(width)
    xs = torch.arange(width).repeat(y1 - y0)
    return pixel_features(maps, size, ys, xs)


def feature_dim(shapes: Sequence[tuple[int, int, int]]) -> int:
    return sum(s[0] for s in shapes)

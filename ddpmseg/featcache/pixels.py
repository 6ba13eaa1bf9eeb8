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
        m = _native_map(m, None)
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
    return TileFeatures(maps, size).rows(y0, y1).T.contiguous()


class TileFeatures:
    """Dense pixel features of row tiles of one image, from its native (C, h, w) maps.

    The reference's definition (each map bilinearly upsampled to (H, W) with align_corners
    False, concatenated step-major then block), computed separably for only the rows asked:
    the two source rows of each output row are blended at the map's own width, then one matrix
    product with the (w, W) column-interpolation matrix widens them. Equal to
    ``pixel_features`` up to float32 rounding, and independent of how the image
    is cut into tiles. ``rows`` returns a channels-first (D, n) buffer, reused between calls.
    """

    def __init__(self, maps: Sequence, size: tuple[int, int],
                 device: torch.device | None = None):
        self.size = (int(size[0]), int(size[1]))
        # float32 once per image: half-precision indexing and arithmetic are slow on CPUs.
        self.maps = [_native_map(m, device).float() for m in maps]
        self.device = self.maps[0].device
        self.dim = sum(m.shape[0] for m in self.maps)
        width = self.size[1]
        self._columns = {}
        for m in self.maps:
            w = m.shape[2]
            if w not in self._columns:
                x0, x1, lx = source_coords(width, w, torch.arange(width))
                mat = torch.zeros(w, width, dtype=torch.float32)
                cols = torch.arange(width)
                mat.index_put_((x0, cols), 1.0 - lx, accumulate=True)
                mat.index_put_((x1, cols), lx, accumulate=True)
                self._columns[w] = mat.to(self.device)
        self._buffer: torch.Tensor | None = None

    def rows(self, y0: int, y1: int) -> torch.Tensor:
        """float32 (D, (y1 - y0) * W): features of rows y0..y1-1, pixels row-major."""
        height, width = self.size
        n_rows = y1 - y0
        need = self.dim * n_rows * width
        if self._buffer is None or self._buffer.numel() < need:
            self._buffer = torch.empty(need, dtype=torch.float32, device=self.device)
        out = self._buffer[:need].view(self.dim, n_rows * width)
        ys = torch.arange(y0, y1)
        c0 = 0
        for m in self.maps:
            c, h, w = m.shape
            lo, hi, ly = source_coords(height, h, ys)
            ly = ly.to(self.device)[:, None]
            lo, hi = lo.to(self.device), hi.to(self.device)
            blended = m[:, lo, :] * (1.0 - ly) + m[:, hi, :] * ly          # (C, rows, w)
            torch.mm(blended.view(c * n_rows, w), self._columns[w],
                     out=out[c0:c0 + c].view(c * n_rows, width))
            c0 += c
        return out


def _native_map(m, device: torch.device | None) -> torch.Tensor:
    t = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(m))
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"a native map must be (C, h, w), got {tuple(t.shape)}")
    return t.to(device) if device is not None else t


def feature_dim(shapes: Sequence[tuple[int, int, int]]) -> int:
    return sum(s[0] for s in shapes)

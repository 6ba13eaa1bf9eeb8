"""The reference's pixel features, computed from native-resolution maps at chosen pixels only.

The reference upsamples every (step, block) map to the label size with
``F.interpolate(mode="bilinear", align_corners=False)`` and concatenates them step-major, then
block. Bilinear upsampling is separable and each output pixel reads at most a 2x2 neighbourhood,
so any pixel's feature can be computed from the small native maps without the dense tensor.

Three kernels, one definition of the taps (``source_coords``):

* ``pixel_features``: sparse, per image (any pixels of one image's maps);
* ``TileFeatures`` / ``dense_rows``: dense, separable, for row tiles (prediction);
* ``MapLayout``: a pool of many images' maps, channels-last and grouped by resolution, and the
  batched gather over it (training minibatches: any pixels of any pooled images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddpmseg.core.errors import BadInputError


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
        raise BadInputError(f"a native map must be (C, h, w), got {tuple(t.shape)}",
                            "give each map of the features as one (C, h, w) array")
    return t.to(device) if device is not None else t


class MapLayout:
    """Where each stored map lives in a pool of images' maps, and the gather over that pool.

    The pool keeps the maps as float32, channels-last and grouped by resolution ((S, h, w, C_g)
    per distinct (h, w), S image slots), so the features of any pixels of any pooled images
    take one fused gather per resolution: ``embedding_bag`` sums each pixel's four bilinear
    taps (rows of C_g channels) with their weights in a single pass. float32 because that
    kernel needs the weights' dtype (a float16 pool would round every feature to float16);
    upcasting float16 taps before it instead costs extra passes, 2-3x slower. The taps and
    weights of a chunk's pixels are computed once (``taps``) and each run of them gathered
    (``gather``). The output is in the reference's order (step-major, then block): one ``cat``
    lays each group's column segments into its maps' feature columns, so no caller ever
    reorders features or weights.
    """

    dtype = torch.float32

    def __init__(self, info, device: torch.device):
        self.size = tuple(info.image_size)
        self.dim = sum(s[0] for s in info.shapes)
        self.device = device
        groups: dict[tuple[int, int], list] = {}
        col = 0
        for j, (c, h, w) in enumerate(info.shapes):
            groups.setdefault((h, w), []).append((j, c, col))
            col += c
        self.groups = []          # (h, w, channels, [(pool c0, pool c1, feature column)])
        self.map_slot = {}        # map j -> (group index, pool c0, pool c1)
        for g, ((h, w), members) in enumerate(groups.items()):
            c0, segments = 0, []
            for j, c, fcol in members:
                self.map_slot[j] = (g, c0, c0 + c)
                prev = segments[-1] if segments else None
                if prev is not None and prev[1] == c0 and prev[2] + (prev[1] - prev[0]) == fcol:
                    # Adjacent in the pool and in the feature: one copy covers both maps.
                    segments[-1] = (prev[0], c0 + c, prev[2])
                else:
                    segments.append((c0, c0 + c, fcol))
                c0 += c
            self.groups.append((h, w, c0, segments))
        # Every group's segments in feature-column order: (group, pool c0, pool c1).
        self._order = [(g, c0, c1) for _, g, c0, c1 in sorted(
            (fcol, g, c0, c1) for g, (*_, segments) in enumerate(self.groups)
            for c0, c1, fcol in segments)]
        self._table = None

    def image_bytes(self) -> int:
        """Bytes of one image's maps in the pool."""
        return sum(h * w * c for h, w, c, _ in self.groups) * 4

    def allocate(self, slots: int) -> list[torch.Tensor]:
        return [torch.empty((slots, h, w, c), dtype=self.dtype, device=self.device)
                for h, w, c, _ in self.groups]

    def put(self, bufs: list[torch.Tensor], slot: int, maps: Sequence) -> None:
        """Copy one image's (C, h, w) maps (any float dtype) into ``slot`` of the pool."""
        for j, m in enumerate(maps):
            g, c0, c1 = self.map_slot[j]
            t = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(m))
            bufs[g][slot, :, :, c0:c1].copy_(t.permute(1, 2, 0))

    def _tables(self):
        """Per image pixel, for every group: its 4 bilinear taps (flat offsets in the group's
        map, order (y0,x0) (y0,x1) (y1,x0) (y1,x1)) and their weights, from ``source_coords``.
        Built once: (G, H*W, 4) int64 and float32."""
        if self._table is None:
            height, width = self.size
            flat = torch.arange(height * width)
            ys, xs = flat // width, flat % width
            taps, weights, sizes = [], [], []
            for h, w, *_ in self.groups:
                y0, y1, ly = source_coords(height, h, ys)
                x0, x1, lx = source_coords(width, w, xs)
                taps.append(torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], 1))
                weights.append(torch.stack([(1 - lx) * (1 - ly), lx * (1 - ly),
                                            (1 - lx) * ly, lx * ly], 1))
                sizes.append(h * w)
            self._table = (torch.stack(taps).to(self.device),
                           torch.stack(weights).to(self.device),
                           torch.tensor(sizes, device=self.device)[:, None, None])
        return self._table

    def taps(self, slots: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool rows (G, n, 4) int64 and weights (G, n, 4) float32 of the four bilinear taps
        of pixels ``flat`` (y * W + x) of the images in ``slots`` (pool slot per pixel), for
        every resolution group. Computed once for a chunk's pixels in visiting order, then
        ``gather`` reads any run of them: ``gather(bufs, rows[:, a:b], weights[:, a:b])``."""
        taps, weights, sizes = self._tables()
        return taps[:, flat] + slots[None, :, None] * sizes, weights[:, flat]

    def gather(self, bufs: list[torch.Tensor], rows: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
        """float32 (n, D) features from taps (``taps``), in the reference's feature order.

        One ``embedding_bag`` per group sums each pixel's four taps with their weights in a
        single pass (float32, the taps in the order of ``_tables``); one ``cat`` then lays the
        groups' column segments out in feature order. Row k depends on tap row k only, so any
        run of pixels gives the same rows however it is cut.
        """
        got = [F.embedding_bag(rows[g], buf.view(-1, c), mode="sum",
                               per_sample_weights=weights[g])
               for g, ((h, w, c, _), buf) in enumerate(zip(self.groups, bufs))]
        if len(self._order) == 1:
            return got[0]
        return torch.cat([got[g][:, c0:c1] for g, c0, c1 in self._order], dim=1)

    def features(self, bufs: list[torch.Tensor], slots: torch.Tensor,
                 flat: torch.Tensor) -> torch.Tensor:
        """float32 (n, D) features of pixels ``flat`` (y * W + x) of the images in ``slots``
        (pool slot per pixel), in the reference's feature order: ``gather`` of ``taps``.

        Same taps and weights as ``pixel_features`` (the weighted sum of the four taps instead
        of two nested blends: equal within a float32 rounding).
        """
        return self.gather(bufs, *self.taps(slots, flat))

"""Pixel features from native maps equal the reference's dense bilinear upsampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpmseg.featcache import pixels
from ddpmseg.spec import FeatureSpec, feature_dim
from ddpmseg.featcache.store import StoreInfo


def dense_reference(maps, size):
    """The reference: every map upsampled to ``size``, concatenated -> (D, H, W)."""
    return torch.cat([F.interpolate(m[None].float(), size=size, mode="bilinear",
                                    align_corners=False)[0] for m in maps])


def assert_close_rel(actual, expected, rel=2e-6):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("size, natives", [
    ((64, 64), [(16, 16), (32, 32), (64, 64)]),     # square, x4 x2 x1
    ((48, 80), [(12, 20), (24, 40)]),               # non-square
    ((50, 70), [(7, 9), (25, 35)]),                 # odd, non-integer scale factors
    ((33, 21), [(11, 7), (3, 3)]),                  # odd scale factors 3 and 7/11
    ((256, 256), [(8, 8), (32, 32), (128, 128)]),   # the 256px decoder levels
    ((17, 17), [(17, 17), (1, 1)]),                 # identity and a single source pixel
])
def test_pixel_features_equal_interpolate(size, natives):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(3 + k, h, w, generator=gen) for k, (h, w) in enumerate(natives)]
    dense = dense_reference(maps, size)
    n = min(size[0] * size[1], 4000)
    flat = torch.randperm(size[0] * size[1], generator=gen)[:n]
    ys, xs = flat // size[1], flat % size[1]
    got = pixels.pixel_features(maps, size, ys, xs)
    assert got.shape == (n, sum(m.shape[0] for m in maps)) and got.dtype == torch.float32
    assert_close_rel(got, dense[:, ys, xs].T)


def test_corners_and_edges_included():
    size = (40, 24)
    maps = [torch.randn(5, 5, 3), torch.randn(2, 20, 12)]
    ys = torch.tensor([0, 0, 39, 39, 20, 0, 39])
    xs = torch.tensor([0, 23, 0, 23, 11, 12, 5])
    assert_close_rel(pixels.pixel_features(maps, size, ys, xs),
                     dense_reference(maps, size)[:, ys, xs].T)


def test_float16_numpy_maps_are_upcast_like_the_reference():
    gen = torch.Generator().manual_seed(1)
    maps16 = [torch.randn(4, 8, 8, generator=gen).half(),
              torch.randn(3, 16, 16, generator=gen).half()]
    size = (32, 32)
    ys, xs = (g.ravel() for g in torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij"))
    got = pixels.pixel_features([m.numpy() for m in maps16], size, ys, xs)
    want = dense_reference([m.float() for m in maps16], size)[:, ys, xs].T
    assert_close_rel(got, want)


def test_dense_rows_are_the_dense_tensor_rows():
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(6, 9, 5, generator=gen), torch.randn(2, 18, 10, generator=gen)]
    size = (36, 20)
    dense = dense_reference(maps, size)
    rows = pixels.dense_rows(maps, size, 7, 13)
    assert rows.shape == (6 * 20, 8)
    assert_close_rel(rows, dense[:, 7:13].reshape(8, -1).T)


def test_feature_dim():
    assert feature_dim([(1024, 32, 32), (512, 32, 32), (256, 128, 128)]) == 1792
    assert np.isclose(feature_dim([]), 0)


def test_pool_gather_is_the_reference_order_dense_features(tmp_path):
    # Non-square image, maps at three resolutions, two sharing one and interleaved with the
    # others in feature order: the pool groups them, the output must not.
    shapes = ((3, 5, 7), (4, 10, 14), (2, 5, 7), (6, 20, 28))
    info = StoreInfo(FeatureSpec(steps=(1, 2), blocks=(5, 8), shapes=shapes, image_size=(20, 28),
                                 dtype="float32"),
                     num_images=3, names=("a", "b", "c"), num_classes=2, ignore_label=255)
    gen = torch.Generator().manual_seed(0)
    images = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    layout = pixels.MapLayout(info, torch.device("cpu"))
    bufs = layout.allocate(3)
    slot_image = (2, 0, 1)
    for slot, i in enumerate(slot_image):
        layout.put(bufs, slot, images[i])
    ys = torch.randint(0, 20, (60,), generator=gen)
    xs = torch.randint(0, 28, (60,), generator=gen)
    slots = torch.randint(0, 3, (60,), generator=gen)
    got = layout.features(bufs, slots, ys * 28 + xs)
    dense = [dense_reference(maps, (20, 28)) for maps in images]
    want = torch.stack([dense[slot_image[int(s)]][:, int(y), int(x)]
                        for s, y, x in zip(slots, ys, xs)])
    assert_close_rel(got, want)
    # Row k depends on pixel k only: a run cut in two gives the same rows, bit for bit.
    half = torch.cat([layout.features(bufs, slots[:25], (ys * 28 + xs)[:25]),
                      layout.features(bufs, slots[25:], (ys * 28 + xs)[25:])])
    assert torch.equal(half, got)

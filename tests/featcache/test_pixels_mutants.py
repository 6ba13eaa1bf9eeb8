"""Pixel-gather checks that kill mutants the older tests let through (bench/mutation.py)."""

import torch

from ddpmseg.featcache import pixels
from ddpmseg.featcache.spec import FeatureSpec
from ddpmseg.featcache.store import StoreInfo


def test_the_pool_gather_runs_on_the_layouts_device():
    # The meta device stands in for a GPU: the tap tables must move there with the pool, or
    # the gather would index a CPU table with device pixels.
    shapes = ((3, 5, 7), (4, 10, 14))
    spec = FeatureSpec(steps=(1,), blocks=(5, 8), shapes=shapes, image_size=(20, 28),
                       dtype="float32")
    info = StoreInfo(spec, num_images=1, names=("a",), num_classes=2, ignore_label=255)
    meta = torch.device("meta")
    layout = pixels.MapLayout(info, meta)
    flat = torch.arange(10, device=meta)
    out = layout.features(layout.allocate(2), torch.zeros(10, dtype=torch.int64, device=meta),
                          flat)
    assert out.device == meta and out.shape == (10, 7) and out.dtype == torch.float32

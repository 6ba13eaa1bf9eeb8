"""Pixel-gather checks that kill mutants the older tests let through (bench/mutation.py)."""

import torch

from ddpmseg.featcache import pixels
from ddpmseg.spec import FeatureSpec
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


def test_adjacent_maps_of_one_resolution_are_one_copy_and_the_right_features():
    # Maps 0 and 1 share a resolution and follow each other in the feature: one segment.
    shapes = ((2, 5, 7), (3, 5, 7), (4, 10, 14))
    spec = FeatureSpec(steps=(1,), blocks=(5, 6, 8), shapes=shapes, image_size=(20, 28),
                       dtype="float32")
    info = StoreInfo(spec, num_images=1, names=("a",), num_classes=2, ignore_label=255)
    layout = pixels.MapLayout(info, torch.device("cpu"))
    assert [segments for *_, segments in layout.groups] == [[(0, 5, 0)], [(0, 4, 5)]]
    assert layout.image_bytes() == (5 * 7 * 5 + 10 * 14 * 4) * 4
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(s, generator=gen) for s in shapes]
    bufs = layout.allocate(1)
    layout.put(bufs, 0, maps)
    flat = torch.arange(0, 20 * 28, 7)
    got = layout.features(bufs, torch.zeros(len(flat), dtype=torch.int64), flat)
    want = pixels.pixel_features(maps, (20, 28), flat // 28, flat % 28)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_map_with_a_batch_axis_of_one_is_read_as_its_image():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(3, 4, 5, generator=gen)
    ys, xs = torch.tensor([0, 7, 3]), torch.tensor([9, 0, 4])
    assert torch.equal(pixels.pixel_features([m[None]], (8, 10), ys, xs),
                       pixels.pixel_features([m], (8, 10), ys, xs))


def test_taps_computed_once_then_gathered_by_runs_are_the_features_bit_for_bit():
    # Three resolutions, maps of one resolution apart in feature order: the gather's cat must
    # put every segment back in its feature columns, whatever run of the taps it reads.
    shapes = ((2, 5, 7), (3, 10, 14), (4, 5, 7), (2, 20, 28))
    spec = FeatureSpec(steps=(1, 2), blocks=(5, 8), shapes=shapes, image_size=(20, 28),
                       dtype="float32")
    info = StoreInfo(spec, num_images=2, names=("a", "b"), num_classes=2, ignore_label=255)
    layout = pixels.MapLayout(info, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    images = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    bufs = layout.allocate(2)
    for slot, maps in enumerate(images):
        layout.put(bufs, slot, maps)
    flat = torch.randint(0, 20 * 28, (40,), generator=gen)
    slots = torch.randint(0, 2, (40,), generator=gen)
    rows, weights = layout.taps(slots, flat)
    assert rows.shape == weights.shape == (3, 40, 4)
    whole = layout.gather(bufs, rows, weights)
    assert torch.equal(whole, layout.features(bufs, slots, flat))
    assert torch.equal(torch.cat([layout.gather(bufs, rows[:, a:a + 16], weights[:, a:a + 16])
                                  for a in range(0, 40, 16)]), whole)
    for k in range(40):
        want = pixels.pixel_features(images[int(slots[k])], (20, 28), flat[k:k + 1] // 28,
                                     flat[k:k + 1] % 28)
        torch.testing.assert_close(whole[k:k + 1], want, rtol=1e-5, atol=1e-5)

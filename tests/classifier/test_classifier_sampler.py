import numpy as np
import pytest
import torch

from ddpmseg.classifier import sampler as S
from ddpmseg.featcache import pixels
from ddpmseg.featcache.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo



def test_pool_features_equal_pixel_features(tmp_path):
    # Non-square image, maps at three resolutions, two of them sharing one.
    shapes = ((3, 5, 7), (4, 10, 14), (2, 5, 7), (6, 20, 28))
    info = StoreInfo(FeatureSpec(steps=(1, 2), blocks=(5, 8), shapes=shapes, image_size=(20, 28)),
                     num_images=3, names=("a", "b", "c"), num_classes=2, ignore_label=255)
    rng = np.random.default_rng(0)
    store = FeatureStore.create(tmp_path / "s.zarr", info)
    for i in range(3):
        store.write_image(i, [rng.normal(size=s).astype(np.float32) for s in shapes],
                          np.zeros((20, 28), np.uint8))
    layout = S.MapLayout(info, torch.device("cpu"))
    bufs = layout.allocate(3)
    for slot, i in enumerate((2, 0, 1)):
        layout.put(bufs, slot, store.maps(i))
    ys = torch.from_numpy(rng.integers(0, 20, 50))
    xs = torch.from_numpy(rng.integers(0, 28, 50))
    slots = torch.from_numpy(rng.integers(0, 3, 50))
    got = layout.to_feature_order(layout.features(bufs, slots, ys * 28 + xs))
    assert not layout.identity
    image_of_slot = [2, 0, 1]
    for k in range(50):
        want = pixels.pixel_features(store.maps(image_of_slot[int(slots[k])]), (20, 28),
                                     ys[k:k + 1], xs[k:k + 1])
        # Same taps and weights; torch.lerp blends within a float32 rounding of the reference.
        torch.testing.assert_close(got[k:k + 1], want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_store):
    return make_store(tmp_path_factory.mktemp("sampler") / "s.zarr", n_images=5)


def _epoch(plan, source, epoch):
    with source.session(plan) as session:
        return [(x.clone(), y.clone()) for x, y in S.batches(plan, session, epoch,
                                                             torch.device("cpu"))]


def test_plan_visits_every_labelled_pixel_once(store):
    index = S.PixelIndex.from_store(store)
    plan = S.EpochPlan(index, chunk_images=2, seed=7, batch_size=64)
    for epoch in range(2):
        rows = np.concatenate([plan.chunk_rows(epoch, c, imgs)[1]
                               for c, imgs in enumerate(plan.image_chunks(epoch))])
        assert np.array_equal(np.sort(rows), np.arange(index.total))
    assert sum(plan.batch_sizes) == index.total
    assert all(b == 64 for b in plan.batch_sizes[:-1])
    # Different epochs and seeds visit in other orders.
    r0 = plan.chunk_rows(0, 0, plan.image_chunks(0)[0])[1]
    r1 = plan.chunk_rows(1, 0, plan.image_chunks(1)[0])[1]
    assert not np.array_equal(r0, r1)


def test_a_last_batch_of_one_pixel_joins_the_previous_one(store):
    index = S.PixelIndex.from_store(store)
    plan = S.EpochPlan(index, 5, 0, batch_size=index.total - 1)
    assert plan.batch_sizes == [index.total]
    plan = S.EpochPlan(index, 5, 0, batch_size=index.total - 2)
    assert plan.batch_sizes == [index.total - 2, 2]


def test_streaming_and_in_memory_give_identical_minibatches(store):
    index = S.PixelIndex.from_store(store)
    cpu = torch.device("cpu")
    in_memory = S.InMemorySource(store, index, cpu)
    for chunk in (5, 2):  # all images resident; then two-image chunks, double-buffered
        plan = S.EpochPlan(index, chunk, seed=3, batch_size=50)
        stream = S.StreamSource(store, index, cpu, chunk)
        assert stream.resident == (chunk == 5)
        for epoch in (0, 1):
            a, b = _epoch(plan, stream, epoch), _epoch(plan, in_memory, epoch)
            assert len(a) == len(b) == len(plan.batch_sizes)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
            # The epoch's pixels are exactly the labelled pixels (as multisets of features).
            x = torch.cat([x for x, _ in a])
            assert x.shape[0] == index.total
            y = torch.cat([y for _, y in a]).numpy()
            assert np.array_equal(np.bincount(y, minlength=3), np.bincount(index.labels, minlength=3))
        stream.close()


def test_in_memory_rows_are_the_reference_dense_features(store):
    index = S.PixelIndex.from_store(store)
    src = S.InMemorySource(store, index, torch.device("cpu"))
    i = 3
    lab = store.labels(i)
    ys, xs = np.nonzero(lab != 255)
    want = store.pixel_features(i, ys, xs)
    a, b = index.offsets[i], index.offsets[i + 1]
    torch.testing.assert_close(src.layout.to_feature_order(src.x[a:b]), want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(index.labels[a:b], lab[ys, xs])


def test_stopping_mid_epoch_stops_the_loader(store):
    index = S.PixelIndex.from_store(store)
    plan = S.EpochPlan(index, 1, seed=0, batch_size=16)
    stream = S.StreamSource(store, index, torch.device("cpu"), 1)
    session = stream.session(plan)
    it = S.batches(plan, session, 0, torch.device("cpu"))
    next(it)
    it.close()
    session.close()
    assert not any(t.name == "ddpmseg-pool-loader" and t.is_alive()
                   for t in __import__("threading").enumerate())


def test_shuffle_size_from_budget():
    assert S.shuffle_images(10, 100, 1000) == 10        # all fit: one global shuffle
    assert S.shuffle_images(30, 100, 1000) == 5         # two chunks of 5 in the budget
    assert S.shuffle_images(30, 100, 50) == 1

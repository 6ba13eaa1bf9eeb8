import numpy as np
import pytest
import torch

from ddpmseg.classifier import sampler
from ddpmseg.core.errors import StoreError


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_store):
    return make_store(tmp_path_factory.mktemp("sampler") / "s.zarr", n_images=5)


def _epoch(plan, source, epoch, dim=1):
    with source.session(plan) as session:
        return [(x.clone(), y.clone()) for x, y in sampler.batches(plan, session, epoch,
                                                             torch.device("cpu"), dim)]


def test_plan_visits_every_labelled_pixel_once(store):
    index = sampler.PixelIndex.from_store(store)
    plan = sampler.EpochPlan(index, chunk_images=2, seed=7, batch_size=64)
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


def _visits(plan, epoch):
    """(image, pixel y * W + x, label) of every pixel the epoch visits, in visiting order."""
    parts = [plan.chunk_rows(epoch, c, imgs) for c, imgs in enumerate(plan.image_chunks(epoch))]
    img = np.concatenate([i for i, _ in parts])
    rows = np.concatenate([r for _, r in parts])
    return img, plan.index.flat[rows], plan.index.labels[rows]


@pytest.mark.parametrize("chunk", [5, 2, 1])
def test_every_labelled_pixel_of_every_image_is_visited_once(store, chunk):
    """Counted from the label maps themselves, not from the index under test."""
    ignore = store.info.ignore_label
    plan = sampler.EpochPlan(sampler.PixelIndex.from_store(store), chunk, seed=7, batch_size=64)
    for epoch in range(2):
        img, flat, lab = _visits(plan, epoch)
        for i in range(len(store)):
            truth = np.asarray(store.labels(i)).ravel()
            labelled = np.flatnonzero(truth != ignore)
            assert labelled.size > 0
            mine = img == i
            assert np.array_equal(np.sort(flat[mine]), labelled), (epoch, i)
            assert np.array_equal(lab[mine], truth[flat[mine]])
        assert set(np.unique(img)) == set(range(len(store)))
        # The minibatches carry the same labels: the class counts of the label maps.
        ys = np.concatenate([y.numpy() for _, y in _epoch(plan, sampler.InMemorySource(
            store, plan.index, torch.device("cpu")), epoch)])
        truth = np.concatenate([np.asarray(store.labels(i)).ravel() for i in range(len(store))])
        assert np.array_equal(np.bincount(ys, minlength=256), np.bincount(
            truth[truth != ignore], minlength=256))


def test_the_order_within_a_chunk_changes_between_epochs(store, make_store, tmp_path):
    # One image: the chunk is the same every epoch, only the pixels' order can change.
    one = make_store(tmp_path / "one.zarr", n_images=1)
    plan = sampler.EpochPlan(sampler.PixelIndex.from_store(one), 1, seed=7, batch_size=64)
    orders = [_visits(plan, epoch)[1] for epoch in range(3)]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    source = sampler.InMemorySource(one, plan.index, torch.device("cpu"))
    labels = [np.concatenate([y.numpy() for _, y in _epoch(plan, source, e)]) for e in (0, 1)]
    assert not np.array_equal(labels[0], labels[1])
    # Several images in a chunk: each image's own pixels come in another order each epoch.
    plan = sampler.EpochPlan(sampler.PixelIndex.from_store(store), 5, seed=7, batch_size=64)
    (img0, flat0, _), (img1, flat1, _) = _visits(plan, 0), _visits(plan, 1)
    for i in range(len(store)):
        assert not np.array_equal(flat0[img0 == i], flat1[img1 == i]), i


def test_a_last_batch_of_one_pixel_joins_the_previous_one(store):
    index = sampler.PixelIndex.from_store(store)
    plan = sampler.EpochPlan(index, 5, 0, batch_size=index.total - 1)
    assert plan.batch_sizes == [index.total]
    plan = sampler.EpochPlan(index, 5, 0, batch_size=index.total - 2)
    assert plan.batch_sizes == [index.total - 2, 2]


def numpy_bilinear(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width) in float64: bilinear, align_corners=False, written from
    its definition (src = (dst + 0.5) * in / out - 0.5, clamped at 0; the upper tap clamped at
    the last row/column), independently of ddpmseg and torch."""
    def taps(out, n):
        src = np.maximum((np.arange(out) + 0.5) * (n / out) - 0.5, 0.0)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n - 1), src - lo
    y0, y1, ly = taps(height, m.shape[1])
    x0, x1, lx = taps(width, m.shape[2])
    m = m.astype(np.float64)
    rows = m[:, y0, :] * (1 - ly)[None, :, None] + m[:, y1, :] * ly[None, :, None]
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def reference_features(store, i: int) -> np.ndarray:
    """(H*W, D): image i's dense features, the maps upsampled and concatenated in store order
    (step-major, then block), as the reference builds them."""
    height, width = store.info.image_size
    dense = np.concatenate([numpy_bilinear(np.asarray(m), height, width)
                            for m in store.maps(i)])
    return dense.reshape(dense.shape[0], -1).T


# Runs of whole chunks, and runs of two minibatches (so runs end inside chunks and minibatches
# straddle chunk ends).
@pytest.mark.parametrize("run_dim", [1, sampler.RUN_BYTES // (4 * 50 * 2)])
def test_minibatch_features_are_the_reference_bilinear_features(store, run_dim):
    index = sampler.PixelIndex.from_store(store)
    cpu = torch.device("cpu")
    ref = {int(i): reference_features(store, int(i)) for i in index.images}
    in_memory = sampler.InMemorySource(store, index, cpu)
    for chunk in (5, 2):  # all images resident; then two-image chunks, double-buffered
        plan = sampler.EpochPlan(index, chunk, seed=3, batch_size=50)
        stream = sampler.StreamSource(store, index, cpu, chunk)
        assert stream.resident == (chunk == 5)
        for epoch in (0, 1):
            a, b = _epoch(plan, stream, epoch, run_dim), _epoch(plan, in_memory, epoch, run_dim)
            assert [len(y) for _, y in a] == plan.batch_sizes
            # The pixels in visiting order, from the plan; their features from numpy.
            order = [plan.chunk_rows(epoch, c, imgs)
                     for c, imgs in enumerate(plan.image_chunks(epoch))]
            img = np.concatenate([o[0] for o in order])
            rows = np.concatenate([o[1] for o in order])
            want = np.stack([ref[int(i)][index.flat[r]] for i, r in zip(img, rows)])
            x = torch.cat([x for x, _ in a]).numpy()
            np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
            assert np.array_equal(torch.cat([y for _, y in a]).numpy(), index.labels[rows])
            # In memory: the same minibatches bit for bit (so the same members).
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
        stream.close()


def test_in_memory_rows_are_the_reference_dense_features(store):
    index = sampler.PixelIndex.from_store(store)
    src = sampler.InMemorySource(store, index, torch.device("cpu"))
    i = 3
    lab = store.labels(i)
    ys, xs = np.nonzero(lab != 255)
    want = reference_features(store, i)[ys * lab.shape[1] + xs]
    a, b = index.offsets[i], index.offsets[i + 1]
    np.testing.assert_allclose(src.x[a:b].numpy(), want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(index.labels[a:b], lab[ys, xs])


def test_stopping_mid_epoch_stops_the_loader(store):
    index = sampler.PixelIndex.from_store(store)
    plan = sampler.EpochPlan(index, 1, seed=0, batch_size=16)
    stream = sampler.StreamSource(store, index, torch.device("cpu"), 1)
    session = stream.session(plan)
    it = sampler.batches(plan, session, 0, torch.device("cpu"), 1)
    next(it)
    it.close()
    session.close()
    assert not any(t.name == "ddpmseg-pool-loader" and t.is_alive()
                   for t in __import__("threading").enumerate())


def test_shuffle_size_from_budget():
    assert sampler.shuffle_images(10, 100, 1000) == 10        # all fit: one global shuffle
    assert sampler.shuffle_images(30, 100, 1000) == 5         # two chunks of 5 in the budget
    assert sampler.shuffle_images(30, 100, 50) == 1


def test_a_streaming_session_asked_for_an_epoch_out_of_order_restarts_there(store):
    """The loader runs ahead in epoch order; asking for another epoch (a resumed member starts
    at its own) restarts it there and gives that epoch's chunks, not an error."""
    index = sampler.PixelIndex.from_store(store)
    plan = sampler.EpochPlan(index, 2, seed=5, batch_size=64)
    stream = sampler.StreamSource(store, index, torch.device("cpu"), 2)
    assert not stream.resident
    with stream.session(plan) as session:
        for epoch in (0, 2, 1):  # 0 then a skip ahead, then back
            got = [c.images.tolist() for c in _consumed(session.chunks(epoch))]
            assert got == [c.tolist() for c in plan.image_chunks(epoch)]


def _consumed(chunks):
    for chunk in chunks:
        yield chunk
        chunk.release()


def test_a_loader_whose_thread_ended_without_a_chunk_raises_instead_of_waiting(store):
    """A loader thread that stops without handing anything over (here: nothing scheduled) is
    an error at the consumer's next get, never a wait for ever."""
    import threading

    layout = sampler.MapLayout(store.info, torch.device("cpu"))
    loader = sampler._Loader(store, layout, [], [layout.allocate(1)])
    loader.thread.join()
    outcome = []

    def consume():
        try:
            loader.get()
        except StoreError as exc:
            outcome.append(str(exc))

    waiter = threading.Thread(target=consume, daemon=True)
    waiter.start()
    waiter.join(60)  # a bound for a hang only: the answer comes within one 0.5 s poll
    assert outcome and "loader thread stopped unexpectedly" in outcome[0]


def test_streaming_holds_the_dense_features_when_they_fit_the_budget(store):
    """The fit's source: the dense rows (a row copy per minibatch) when every labelled pixel's
    features fit the RAM budget on a CPU; the bounded pool otherwise, and always on another
    device (the meta device stands in for a GPU)."""
    index = sampler.PixelIndex.from_store(store)
    dense = sampler.dense_bytes(index, store.info.feature_dim)
    assert dense == index.total * store.info.feature_dim * 4
    need = dense + sampler.image_bytes(store.info)  # the rows and the image they are built from
    cpu = torch.device("cpu")
    src = sampler.make_source(store, index, cpu, 5, need)
    assert isinstance(src, sampler.InMemorySource) and src.x.shape[0] == index.total
    assert isinstance(sampler.make_source(store, index, cpu, 5, need - 1), sampler.StreamSource)
    assert isinstance(sampler.make_source(store, index, torch.device("meta"), 5, need),
                      sampler.StreamSource)
    assert isinstance(sampler.make_source(store, index, cpu, 5, 0, in_memory=True),
                      sampler.InMemorySource)

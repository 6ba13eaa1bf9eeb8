"""Sampler checks that kill mutants the older tests let through (bench/mutation.py).

The epoch order is, by the sampler's contract, a function of (seed, epoch, P) only: these
tests write that function out from numpy's seeded generator, so a changed stream key (which
would also make a resumed run train in another order than the uninterrupted one) fails.
"""

import numpy as np
import pytest

from ddpmseg.classifier import sampler
from ddpmseg.core.errors import BadInputError
from ddpmseg.featcache import content
from ddpmseg.featcache.store import FeatureStore

COUNTS = [3, 0, 4, 2, 5]  # image 1 has no labelled pixel


def tiny_index() -> sampler.PixelIndex:
    offsets = np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int64)
    total = int(offsets[-1])
    return sampler.PixelIndex(offsets, np.arange(total, dtype=np.int32) * 3,
                        (np.arange(total) % 3).astype(np.uint8), (4, 4))


def expected_epoch(seed: int, epoch: int, p: int):
    """[(chunk images, image of each visit, row of each visit)] from the documented order."""
    index = tiny_index()
    images = np.array([0, 2, 3, 4])
    order = images[np.random.default_rng([seed, epoch, 0]).permutation(len(images))]
    out = []
    for c, k in enumerate(range(0, len(order), p)):
        chunk = order[k:k + p]
        img = np.concatenate([[i] * COUNTS[i] for i in chunk])
        rows = np.concatenate([np.arange(index.offsets[i], index.offsets[i + 1]) for i in chunk])
        perm = np.random.default_rng([seed, epoch, 1 + c]).permutation(len(rows))
        out.append((chunk, img[perm], rows[perm]))
    return out


@pytest.mark.parametrize("seed,p", [(7, 2), (0, 3), (11, 4)])
def test_the_epoch_order_is_the_documented_function_of_seed_epoch_and_p(seed, p):
    plan = sampler.EpochPlan(tiny_index(), chunk_images=p, seed=seed, batch_size=4)
    assert plan.images.tolist() == [0, 2, 3, 4]
    for epoch in (0, 1, 2):
        chunks = plan.image_chunks(epoch)
        want = expected_epoch(seed, epoch, p)
        assert [c.tolist() for c in chunks] == [w[0].tolist() for w in want]
        for c, (chunk, w) in enumerate(zip(chunks, want)):
            img, rows = plan.chunk_rows(epoch, c, chunk)
            assert img.tolist() == w[1].tolist() and rows.tolist() == w[2].tolist()


@pytest.mark.parametrize("batch,sizes", [
    (4, [4, 4, 4, 2]),     # 14 pixels
    (5, [5, 5, 4]),
    (13, [14]),            # a last batch of one joins the one before
    (14, [14]),
    (20, [14]),            # one short batch
    (7, [7, 7]),
])
def test_batch_sizes(batch, sizes):
    plan = sampler.EpochPlan(tiny_index(), chunk_images=2, seed=0, batch_size=batch)
    assert plan.batch_sizes == sizes
    assert plan.pixels_per_epoch == 14 and plan.batch_size == batch
    assert plan.chunk_images == 2 and plan.seed == 0


def test_a_last_single_pixel_joins_the_batch_before_when_there_are_many():
    # 13 pixels in batches of 4: 4, 4, 4, 1 -> 4, 4, 5
    offsets = np.array([0, 5, 13], dtype=np.int64)
    index = sampler.PixelIndex(offsets, np.arange(13, dtype=np.int32), np.zeros(13, np.uint8), (4, 4))
    assert sampler.EpochPlan(index, 2, 0, batch_size=4).batch_sizes == [4, 4, 5]


def labelled_store(make_store, path, last_labels=None):
    """A 3-image, 3-class store open for writing; image 2's labels are ``last_labels`` when
    given."""
    store = make_store(path, n_images=3, complete=last_labels is None)
    if last_labels is not None:
        maps = [np.zeros(s, np.float32) for s in store.info.shapes]
        store.write_image(2, maps, last_labels)
    return store


def test_pruned_images_keep_their_place_and_lose_their_pixels(make_store, tmp_path):
    store = labelled_store(make_store, tmp_path / "s.zarr")
    state = content.read_state(store)
    content.write_state(store, store.info, content.ImageState(state.hashes, ("img000",)))
    store = FeatureStore.open(tmp_path / "s.zarr")
    index = sampler.PixelIndex.from_store(store)
    want = [np.flatnonzero(np.asarray(store.labels(i)).ravel() != 255) for i in (1, 2)]
    assert index.counts.tolist() == [0, len(want[0]), len(want[1])]
    assert index.images.tolist() == [1, 2] and index.image_size == (32, 32)
    assert (index.flat.dtype, index.labels.dtype) == (np.int32, np.uint8)
    assert np.array_equal(index.flat, np.concatenate(want))
    assert np.array_equal(index.labels, np.concatenate(
        [np.asarray(store.labels(i)).ravel()[w] for i, w in zip((1, 2), want)]))


def test_a_label_equal_to_the_class_count_is_refused(make_store, tmp_path):
    lab = np.zeros((32, 32), np.uint8)
    lab[0, :2] = [2, 3]  # 3 classes: 0..2; 3 (the class count itself) is outside
    lab[1, 0] = 255
    store = labelled_store(make_store, tmp_path / "s.zarr", lab)
    with pytest.raises(BadInputError) as err:
        sampler.PixelIndex.from_store(store)
    assert str(err.value) == (
        f"{store.path}: image 2 (img002) has labels [3] outside 0..2 (ignore label 255); "
        "re-extract with the right num_classes / ignore_label in [data]")


def test_only_the_first_eight_bad_labels_are_named(make_store, tmp_path):
    lab = np.zeros((32, 32), np.uint8)
    lab[0, :12] = np.arange(3, 15)
    with pytest.raises(BadInputError, match=r"has labels \[3, 4, 5, 6, 7, 8, 9, 10\] outside"):
        sampler.PixelIndex.from_store(labelled_store(make_store, tmp_path / "s.zarr", lab))


def test_a_store_with_every_image_pruned_has_an_empty_index(make_store, tmp_path):
    store = labelled_store(make_store, tmp_path / "s.zarr")
    state = content.read_state(store)
    content.write_state(store, store.info, content.ImageState(state.hashes, store.names))
    index = sampler.PixelIndex.from_store(FeatureStore.open(tmp_path / "s.zarr"))
    assert index.counts.tolist() == [0, 0, 0] and index.total == 0
    assert (index.flat.dtype, index.labels.dtype) == (np.int32, np.uint8)
    assert len(index.flat) == len(index.labels) == 0


def test_the_highest_class_is_accepted(make_store, tmp_path):
    lab = np.full((32, 32), 2, np.uint8)
    lab[0, 0] = 255
    index = sampler.PixelIndex.from_store(labelled_store(make_store, tmp_path / "s.zarr", lab))
    assert index.counts[2] == 32 * 32 - 1 and (index.labels[index.offsets[2]:] == 2).all()

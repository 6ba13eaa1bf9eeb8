"""Sampler checks that kill mutants the older tests let through (bench/mutation.py).

The epoch order is, by the sampler's contract, a function of (seed, epoch, P) only: these
tests write that function out from numpy's seeded generator, so a changed stream key (which
would also make a resumed run train in another order than the uninterrupted one) fails.
"""

import numpy as np
import pytest

from ddpmseg.classifier import sampler as S

COUNTS = [3, 0, 4, 2, 5]  # image 1 has no labelled pixel


def tiny_index() -> S.PixelIndex:
    offsets = np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int64)
    total = int(offsets[-1])
    return S.PixelIndex(offsets, np.arange(total, dtype=np.int32) * 3,
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
    plan = S.EpochPlan(tiny_index(), chunk_images=p, seed=seed, batch_size=4)
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
    plan = S.EpochPlan(tiny_index(), chunk_images=2, seed=0, batch_size=batch)
    assert plan.batch_sizes == sizes
    assert plan.pixels_per_epoch == 14 and plan.batch_size == batch
    assert plan.chunk_images == 2 and plan.seed == 0

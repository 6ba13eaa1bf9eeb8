import math

import pytest
import torch

from ddpmseg.classifier import EarlyStopping, PixelMLP, hidden_widths, simplex_etf


def _cosines(m):
    u = m / m.norm(dim=0, keepdim=True)
    return (u.T @ u).double()


@pytest.mark.parametrize("dim,c", [(32, 10), (32, 29), (128, 34), (32, 33), (128, 129), (5, 2)])
def test_etf_is_a_simplex_etf(dim, c):
    m = simplex_etf(dim, c, seed=3)
    assert m.shape == (dim, c) and m.dtype == torch.float32
    assert torch.allclose(m.norm(dim=0).double(), torch.ones(c, dtype=torch.float64), atol=1e-6)
    gram = _cosines(m)
    off = gram[~torch.eye(c, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-6)
    # Columns sum to zero (the simplex is centred).
    assert m.double().sum(dim=1).abs().max() < 1e-5


@pytest.mark.parametrize("dim,c,seed", [(32, 3, 0), (32, 10, 7), (128, 34, 1)])
def test_etf_is_its_definition_from_the_seed(dim, c, seed, hand_etf):
    # Column for column: class j meets vertex j of the seed's simplex, not another one.
    m = simplex_etf(dim, c, seed=seed).double().numpy()
    assert abs(m - hand_etf(dim, c, seed)).max() < 1e-6


def test_etf_is_fixed_by_seed():
    a, b, other = simplex_etf(32, 10, seed=0), simplex_etf(32, 10, seed=0), simplex_etf(32, 10, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, other, atol=1e-3)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    simplex_etf(32, 10, seed=0)
    assert torch.equal(torch.rand(3), before)


def test_etf_narrower_than_classes_is_a_tight_projection():
    # dim < C - 1: no simplex ETF exists; we use its projection onto a dim-dim subspace.
    dim, c = 8, 20
    m = simplex_etf(dim, c, seed=0).double()
    assert m.shape == (dim, c)
    assert torch.allclose(m @ m.T, c / (c - 1) * torch.eye(dim, dtype=torch.float64), atol=1e-6)
    assert m.sum(dim=1).abs().max() < 1e-6
    # It is the projection of an exact simplex ETF: a C-1 dim one restricted to dim coordinates.
    assert (m.norm(dim=0) < 1 + 1e-6).all()


def test_model_widths_follow_the_class_count():
    assert hidden_widths(29) == (128, 32) and hidden_widths(30) == (256, 128)
    small, wide = PixelMLP(40, 29), PixelMLP(40, 30)
    assert [l.out_features for l in small.layers if isinstance(l, torch.nn.Linear)] == [128, 32, 29]
    assert [l.out_features for l in wide.layers if isinstance(l, torch.nn.Linear)] == [256, 128, 30]
    bns = [l.num_features for l in wide.layers if isinstance(l, torch.nn.BatchNorm1d)]
    assert bns == [256, 128]
    assert small.penultimate_width == 32 and wide.penultimate_width == 128


def test_model_init_and_outputs():
    torch.manual_seed(0)
    m = PixelMLP(500, 5)
    first = m.layers[0]
    assert abs(first.weight.std().item() - 0.02) < 0.002
    assert all(l.bias.abs().max().item() == 0 for l in m.layers if isinstance(l, torch.nn.Linear))
    # The reference's state dict keys (without DataParallel's "module." prefix).
    assert {"layers.0.weight", "layers.2.running_mean", "layers.6.bias"} <= set(m.state_dict())
    m.eval()
    x = torch.randn(7, 500)
    logits, h = m(x, return_features=True)
    assert logits.shape == (7, 5) and h.shape == (7, 32)
    assert torch.equal(m(x), logits) and torch.equal(m.features(x), h)


def test_same_seed_same_model():
    torch.manual_seed(1)
    a = PixelMLP(30, 4)
    torch.manual_seed(1)
    b = PixelMLP(30, 4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_early_stopping_rule():
    stop = EarlyStopping(min_epochs=3, patience=2)
    # Epochs 0..3 never count, whatever the loss does.
    for epoch in range(4):
        for loss in (9.0, 10.0, 11.0, 12.0, 13.0):
            assert not stop.step(epoch, loss)
    # Epoch 4: a new best resets the count; the 3rd non-improving step in a row (> patience)
    # stops. Equal losses are not improvements (strict <, as in the reference).
    seq = [5.0, 4.0, 4.0, 4.5, 3.0, 3.0, 3.0, 3.0]
    got = [stop.step(4, v) for v in seq]
    assert got == [False] * 7 + [True]
    assert stop.best == 3.0


def test_early_stopping_counts_across_epochs():
    stop = EarlyStopping(min_epochs=0, patience=50)
    assert not stop.step(1, 1.0)
    assert not any(stop.step(1, 2.0) for _ in range(30))
    # The count carries over into the next epoch (the reference never resets it per epoch).
    results = [stop.step(2, 2.0) for _ in range(21)]
    assert results[:-1] == [False] * 20 and results[-1] is True
    assert math.isfinite(stop.best)

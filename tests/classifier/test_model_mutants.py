"""Model checks (simplex ETF, early stopping) that kill mutants the older tests let through
(bench/mutation.py)."""

import logging
import math

import numpy as np
import pytest
import torch

from ddpmseg.classifier import EarlyStopping, PixelMLP, simplex_etf
from ddpmseg.core.errors import ConfigError


def test_the_smallest_etf_is_two_opposite_unit_vectors():
    # dim 1, 2 classes: dim = C - 1, an exact simplex ETF: the points +1 and -1.
    m = simplex_etf(1, 2, seed=0)
    assert m.shape == (1, 2)
    assert abs(abs(m[0, 0].item()) - 1) < 1e-6 and abs(m[0, 0].item() + m[0, 1].item()) < 1e-6


@pytest.mark.parametrize("dim,c,message", [
    (5, 1, "a simplex ETF needs at least 2 classes, got 1"),
    (0, 3, "a simplex ETF needs a positive dim, got 0"),
])
def test_impossible_shapes_are_refused(dim, c, message):
    # One of ddpmseg's errors (a ValueError still), with a hint naming the parameter.
    with pytest.raises(ConfigError) as err:
        simplex_etf(dim, c)
    assert isinstance(err.value, ValueError)
    assert err.value.message == message and "`" in err.value.hint


def test_only_a_too_narrow_layer_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ddpmseg.classifier.model"):
        simplex_etf(9, 10)      # dim = C - 1: exact
        simplex_etf(10, 10)
        assert caplog.messages == []
        simplex_etf(8, 20)
    assert caplog.messages == [
        "ETF: 20 classes need a 19-dim feature for an exact simplex ETF, the penultimate layer "
        "has 8; using the ETF's projection onto a 8-dim subspace (a tight frame, not exactly "
        "equiangular)"]


@pytest.mark.parametrize("dim,c", [(9, 10), (8, 20)])
def test_a_narrow_etf_is_scaled_like_the_simplex(dim, c):
    # M M^T = C/(C-1) I: the sqrt(C/(C-1)) scale of the definition, whichever branch.
    m32 = simplex_etf(dim, c, seed=2)
    assert m32.dtype == torch.float32 and m32.is_contiguous()
    m = m32.double()
    assert torch.allclose(m @ m.T, c / (c - 1) * torch.eye(dim, dtype=torch.float64), atol=1e-6)
    assert math.isclose(m.sum().item(), 0.0, abs_tol=1e-5)


def test_early_stopping_defaults_are_the_references():
    stop = EarlyStopping()
    assert (stop.min_epochs, stop.patience, stop.count, stop.best) == (3, 50, 0, math.inf)
    # Epoch 3 never counts, epoch 4 does: 51 non-improving steps in a row stop it.
    assert not any(stop.step(3, 1.0) for _ in range(200))
    assert [stop.step(4, 1.0) for _ in range(52)] == [False] * 51 + [True]


def test_a_first_counted_step_that_does_not_improve_counts_once():
    # Nothing is below an infinite best loss: the step counts as non-improving, once.
    stop = EarlyStopping(min_epochs=0, patience=1)
    assert not stop.step(1, math.inf)
    assert stop.count == 1
    assert stop.step(1, math.inf)


def test_a_square_etf_is_an_exact_simplex_etf():
    # dim = C (128 classes on the wide MLP's 128-wide penultimate layer) takes the usual
    # construction: a (dim, C) frame of unit columns at cosine -1/(C-1).
    c = 10
    m = simplex_etf(c, c, seed=4).double()
    assert m.shape == (c, c)
    assert torch.allclose(m.norm(dim=0), torch.ones(c, dtype=torch.float64), atol=1e-6)
    cos = (m.T @ m)[~torch.eye(c, dtype=torch.bool)]
    assert torch.allclose(cos, torch.full_like(cos, -1 / (c - 1)), atol=1e-6)


def test_the_etf_seed_defaults_to_zero():
    assert torch.equal(simplex_etf(32, 10), simplex_etf(32, 10, seed=0))


def test_linear_weights_start_centred_at_zero():
    torch.manual_seed(0)
    first = PixelMLP(500, 5).layers[0].weight
    assert abs(first.mean().item()) < 0.002 and abs(first.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("dim,c,seed", [(8, 20, 0), (9, 10, 3), (8, 10, 1)])
def test_a_narrow_etf_is_its_definition_from_the_seed(dim, c, seed):
    # dim < C: M = sqrt(C/(C-1)) B^T, B the last dim columns of the Q of [1/sqrt(C) | G], G a
    # (C, dim) float64 Gaussian from torch.Generator(seed); QR here by numpy.
    torch.manual_seed(123)  # the global RNG must play no part
    g = torch.randn(c, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = np.linalg.qr(np.concatenate([np.full((c, 1), 1 / np.sqrt(c)), g.numpy()], axis=1))
    want = np.sqrt(c / (c - 1)) * q[:, 1:].T
    assert abs(simplex_etf(dim, c, seed=seed).double().numpy() - want).max() < 1e-6


def test_one_dimension_short_of_the_simplex_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ddpmseg.classifier.model"):
        simplex_etf(8, 10)
    assert len(caplog.messages) == 1 and "10 classes need a 9-dim feature" in caplog.messages[0]


@pytest.mark.parametrize("dim,c,seed", [(32, 10, 0), (128, 34, 1), (32, 3, 5)])
def test_the_etf_is_computed_in_float64_and_rounded_once(dim, c, seed):
    # The docstring's promise, bit for bit: every factor float64, one cast at the end.
    g = torch.randn(dim, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, _ = torch.linalg.qr(g)
    centre = torch.eye(c, dtype=torch.float64) - 1.0 / c
    want = (math.sqrt(c / (c - 1)) * u @ centre).to(torch.float32)
    assert torch.equal(simplex_etf(dim, c, seed=seed), want)

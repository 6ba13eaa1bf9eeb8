"""The pixel classifier, the simplex-ETF regulariser and the early-stopping rule.

``PixelMLP`` is the reference's ``pixel_classifier``: Linear, ReLU, BatchNorm1d twice, then a
Linear head. Its module layout (one ``layers`` Sequential, indices 0..6) is the reference's, so
a reference checkpoint's state dict (without DataParallel's ``module.`` prefix) loads into it.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ddpmseg.core.errors import ConfigError

log = logging.getLogger(__name__)

# The reference switches to the wider MLP at 30 classes.
WIDE_FROM_CLASSES = 30


def hidden_widths(num_classes: int) -> tuple[int, int]:
    """(first, penultimate) hidden widths: 128, 32 below 30 classes, else 256, 128."""
    return (128, 32) if num_classes < WIDE_FROM_CLASSES else (256, 128)


def make_trunk(dim: int, widths: tuple[int, int]) -> nn.Sequential:
    """dim -> w1 -> w2 with ReLU then BatchNorm1d after each Linear (the reference's order)."""
    w1, w2 = widths
    return nn.Sequential(nn.Linear(dim, w1), nn.ReLU(), nn.BatchNorm1d(w1),
                         nn.Linear(w1, w2), nn.ReLU(), nn.BatchNorm1d(w2))


def init_normal(module: nn.Module, gain: float = 0.02) -> None:
    """The reference's ``init_weights('normal', 0.02)``: Linear weights N(0, gain), biases 0.

    BatchNorm1d layers keep PyTorch's defaults (weight 1, bias 0): the reference's init only
    matches ``BatchNorm2d`` by class name.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)


class PixelMLP(nn.Module):
    """Per-pixel classifier: dim -> 128 -> 32 -> C (C < 30) or dim -> 256 -> 128 -> C.

    ``forward(x)`` gives logits; ``forward(x, return_features=True)`` gives (logits, h) with h the
    penultimate feature (after its BatchNorm) that the ETF regulariser reads in "shared" mode.
    Construction draws from torch's global RNG exactly as the reference does (PyTorch's default
    Linear init, then the normal re-init), so a seeded construction is reproducible.
    """

    def __init__(self, dim: int, num_classes: int, init: bool = True):
        super().__init__()
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.widths = hidden_widths(self.num_classes)
        trunk = make_trunk(self.dim, self.widths)
        self.layers = nn.Sequential(*trunk, nn.Linear(self.widths[1], self.num_classes))
        if init:
            init_normal(self)

    @property
    def penultimate_width(self) -> int:
        return self.widths[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[:-1](x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = self.layers[:-1](x)
        logits = self.layers[-1](h)
        return (logits, h) if return_features else logits


def simplex_etf(dim: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A fixed simplex equiangular tight frame M, float32 (dim, num_classes), from a seed.

    M = sqrt(C/(C-1)) U (I - 11^T/C): columns of unit norm with pairwise cosine -1/(C-1).
    U comes from the QR decomposition of a Gaussian matrix drawn by a ``torch.Generator``
    seeded with ``seed`` (computed in float64, then cast): same seed, same M.

    * dim >= C: U (dim x C) has orthonormal columns (the usual construction).
    * dim < C: no dim x C matrix has orthonormal columns, but a simplex ETF only spans the
      (C-1)-dim subspace orthogonal to the all-ones vector. U = B^T, with B (C x dim) an
      orthonormal basis of a random dim-dim subspace of that hyperplane (QR of [1 | G], first
      column dropped), so U(I - 11^T/C) = U and M = sqrt(C/(C-1)) B^T.
      - dim = C-1: B spans the whole hyperplane and M is an exact simplex ETF.
      - dim < C-1 (more than dim+1 classes; with the reference's widths only above 129
        classes): a true simplex ETF cannot exist. M is then the orthogonal projection of the
        C-dim simplex ETF onto a random dim-dim subspace of its span: still a tight frame
        (M M^T = C/(C-1) I) with zero-mean columns, but column norms and angles are only
        approximately equal. This is the closest frame that keeps the ETF's linear structure;
        a warning is logged.
    """
    dim, c = int(dim), int(num_classes)
    if c < 2:
        raise ConfigError(f"a simplex ETF needs at least 2 classes, got {c}",
                          "give `num_classes=N` of 2 or more, or `etf=none`")
    if dim < 1:
        raise ConfigError(f"a simplex ETF needs a positive dim, got {dim}",
                          "give a positive `dim=N`")
    gen = torch.Generator().manual_seed(int(seed))
    scale = math.sqrt(c / (c - 1))
    if dim >= c:
        g = torch.randn(dim, c, generator=gen, dtype=torch.float64)
        u, _ = torch.linalg.qr(g)                                   # (dim, c), orthonormal cols
        centre = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
        m = scale * u @ centre
    else:
        if dim < c - 1:
            log.warning("ETF: %d classes need a %d-dim feature for an exact simplex ETF, the "
                        "penultimate layer has %d; using the ETF's projection onto a %d-dim "
                        "subspace (a tight frame, not exactly equiangular)", c, c - 1, dim, dim)
        g = torch.randn(c, dim, generator=gen, dtype=torch.float64)
        ones = torch.full((c, 1), 1.0 / math.sqrt(c), dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.cat([ones, g], dim=1))          # (c, dim + 1)
        m = scale * q[:, 1:].T                                       # (dim, c), zero-sum columns
    return m.to(torch.float32).contiguous()


class EarlyStopping:
    """The reference's break_count rule (train_interpreter.py).

    From epoch ``min_epochs + 1`` on (epochs counted from 0: the reference's ``epoch > 3``),
    every step's batch loss is compared with the best loss seen so far in those epochs: a new
    best resets the count, anything else increments it, and training stops as soon as the count
    exceeds ``patience`` (51 non-improving steps in a row for patience 50), mid-epoch.
    """

    def __init__(self, min_epochs: int = 3, patience: int = 50):
        self.min_epochs = int(min_epochs)
        self.patience = int(patience)
        self.best = math.inf
        self.count = 0

    def step(self, epoch: int, loss: float) -> bool:
        """Record one step's loss; True means stop now."""
        if epoch <= self.min_epochs:
            return False
        if loss < self.best:
            self.best = loss
            self.count = 0
        else:
            self.count += 1
        return self.count > self.patience

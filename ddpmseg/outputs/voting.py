"""Combining the K members of an ensemble into one label per pixel, and how sure it is.

Every function takes the members' logits as a (K, n, C) tensor or a list of K (n, C) tensors.

- ``soft`` (default): argmax of the mean of the members' softmax probabilities.
- ``log``: argmax of the mean of the members' log-softmax (the seed's variant; a geometric mean
  of the probabilities, so one confident member can be outvoted differently than under ``soft``).
- ``hard``: per-pixel majority of the members' argmaxes; a tie goes to the lowest class.

Uncertainty: the entropy (nats) of the mean prediction, and the members' Jensen-Shannon
divergence = entropy of the mean minus the mean of the members' entropies (as the reference's
``predict_labels`` computes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpmseg.config import VOTES
from ddpmseg.core.errors import BadInputError, ConfigError


def _stack(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        stacked = logits
    else:
        stacked = torch.stack(list(logits))
    if stacked.dim() != 3 or stacked.shape[0] == 0:
        raise BadInputError(f"expected member logits of shape (K, n, C) with K >= 1, "
                            f"got {tuple(stacked.shape)}", "give the members' logits stacked")
    return stacked.float()


def check_vote(method: str) -> str:
    """``method`` when it is a vote (``VOTES``); else a ConfigError naming the choices."""
    if method not in VOTES:
        raise ConfigError(f"unknown vote {method!r}", f"use one of {', '.join(VOTES)}")
    return method


def vote(logits, method: str = "soft") -> torch.Tensor:
    """int64 (n,): the ensemble's class per pixel under ``method`` (soft, log or hard)."""
    check_vote(method)
    stacked = _stack(logits)
    if method == "soft":
        return torch.softmax(stacked, dim=-1).mean(dim=0).argmax(dim=-1)
    if method == "log":
        return torch.log_softmax(stacked, dim=-1).mean(dim=0).argmax(dim=-1)
    num_classes = stacked.shape[-1]
    choices = stacked.argmax(dim=-1)  # (K, n); a member's own tie goes to its lowest class
    counts = torch.zeros(choices.shape[1], num_classes, dtype=torch.int64, device=choices.device)
    counts.scatter_add_(1, choices.T, torch.ones_like(choices.T))
    # argmax returns the first maximum: a tie between classes goes to the lowest one.
    return counts.argmax(dim=-1)


def scores(logits, method: str = "soft") -> torch.Tensor:
    """float32 (n, C): per-class scores whose argmax is ``vote(logits, method)`` and which can
    be averaged and interpolated (predictions at another size): the mean probability (soft),
    the mean log-probability (log), or the share of members choosing the class (hard)."""
    check_vote(method)
    stacked = _stack(logits)
    if method == "soft":
        return torch.softmax(stacked, dim=-1).mean(dim=0)
    if method == "log":
        return torch.log_softmax(stacked, dim=-1).mean(dim=0)
    choices = torch.nn.functional.one_hot(stacked.argmax(dim=-1), stacked.shape[-1])
    return choices.float().mean(dim=0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(n,) entropy in nats of (n, C) probabilities, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def uncertainty(logits) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n,) each: entropy of the mean prediction, and the members' JS divergence."""
    stacked = _stack(logits)
    p = torch.softmax(stacked, dim=-1)
    mean_entropy = entropy(p.mean(dim=0))
    member_entropy = entropy(p).mean(dim=0)
    # Mathematically >= 0; rounding can leave a tiny negative where all members agree.
    jsd = (mean_entropy - member_entropy).clamp_min(0.0)
    return mean_entropy, jsd

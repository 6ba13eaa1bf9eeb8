"""Voting and uncertainty on hand-made member logits, checked against hand-computed answers."""

import math

import pytest
import torch

from ddpmseg.core.errors import BadInputError, ConfigError
from ddpmseg.outputs.voting import VOTES, check_vote, uncertainty, vote


def logits_of(probs):
    """Member logits whose softmax is ``probs``: (K, n, C) log-probabilities."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_soft_and_log_disagree():
    # One pixel, three members, two classes.
    # soft: mean p(0) = (0.99 + 0.1 + 0.1) / 3 = 0.397 < 0.5 -> class 1
    # log:  mean log p(0) = (ln .99 + 2 ln .1) / 3 = -1.538 > mean log p(1) = (ln .01 + 2 ln .9) / 3
    #       = -1.605 -> class 0
    probs = [[[0.99, 0.01]], [[0.1, 0.9]], [[0.1, 0.9]]]
    x = logits_of(probs)
    assert vote(x, "soft").tolist() == [1]
    assert vote(x, "log").tolist() == [0]
    assert vote(x, "hard").tolist() == [1]  # two of three members say 1


def test_hard_majority_and_ties():
    # Pixel 0: members pick 2 and 1 -> tie -> lowest class, 1.
    # Pixel 1: members pick 3, 3, 0, 0 -> tie -> 0.
    # Pixel 2: members pick 0, 0 (weakly), 2 (strongly): hard says 0, soft says 2.
    two = logits_of([
        [[0.1, 0.2, 0.7, 0.0 + 1e-9], [0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.3 - 1e-9, 1e-9]],
        [[0.1, 0.7, 0.2, 1e-9], [0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.3 - 1e-9, 1e-9]],
    ])
    # Two more members for pixel 1 (0, 0); for the other pixels they repeat members 0 and 1 so
    # pixel 0 stays a 2-2 tie and pixel 2 gets a strong 2 vote twice.
    extra = logits_of([
        [[0.1, 0.2, 0.7, 1e-9], [0.7, 0.1, 0.1, 0.1], [1e-9, 1e-9, 1.0 - 2e-9, 1e-9]],
        [[0.1, 0.7, 0.2, 1e-9], [0.7, 0.1, 0.1, 0.1], [1e-9, 1e-9, 1.0 - 2e-9, 1e-9]],
    ])
    x = torch.cat([two, extra])
    # Pixel 2's members choose 0, 0, 2, 2: also a tie -> 0. Soft: mean p(2) = (0.3*2 + 2) / 4
    # = 0.65 -> 2.
    assert vote(x, "hard").tolist() == [1, 0, 0]
    assert vote(x, "soft")[2].item() == 2


def test_hard_clear_majority_beats_soft():
    # members: 0.51/0.49, 0.51/0.49, 0.001/0.999 -> hard 0 (2 votes), soft mean p(0) = 0.340 -> 1
    x = logits_of([[[0.51, 0.49]], [[0.51, 0.49]], [[0.001, 0.999]]])
    assert vote(x, "hard").tolist() == [0]
    assert vote(x, "soft").tolist() == [1]


def test_list_input_and_single_member():
    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    for method in VOTES:
        assert vote([a], method).tolist() == [0, 2]
    ent, jsd = uncertainty([a])
    assert torch.all(jsd == 0)


def test_uncertainty_hand_values():
    # Two confident members that disagree: mean (0.5, 0.5): entropy ln 2, members' entropies
    # ~0, so the JS divergence is ~ln 2. Two identical members: JSD 0, entropy = member entropy.
    x = torch.tensor([[[30.0, -30.0], [0.0, 0.0]],
                      [[-30.0, 30.0], [0.0, 0.0]]])
    ent, jsd = uncertainty(x)
    assert ent.tolist() == pytest.approx([math.log(2), math.log(2)], abs=1e-6)
    assert jsd.tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    # p = (0.2, 0.8) in both members: H = -(0.2 ln 0.2 + 0.8 ln 0.8) = 0.500402
    y = logits_of([[[0.2, 0.8]], [[0.2, 0.8]]])
    ent, jsd = uncertainty(y)
    assert ent.item() == pytest.approx(0.5004024, abs=1e-6)
    assert jsd.item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_vote():
    with pytest.raises(ConfigError, match="unknown vote"):
        check_vote("median")
    with pytest.raises(BadInputError):
        vote(torch.zeros(2, 3), "soft")  # not (K, n, C)

"""Voting checks that kill mutants the older tests let through (bench/mutation.py)."""

import pytest
import torch

from ddpmseg.outputs.voting import check_vote, vote

# Three members, three pixels, two classes: member k's probabilities at pixel n.
PROBS = [[[0.99, 0.01], [0.2, 0.8], [0.6, 0.4]],
         [[0.1, 0.9], [0.7, 0.3], [0.6, 0.4]],
         [[0.1, 0.9], [0.7, 0.3], [0.05, 0.95]]]
# By hand:
# soft, mean p(0): (0.99+0.1+0.1)/3 = 0.397 -> 1; (0.2+0.7+0.7)/3 = 0.533 -> 0;
#                  (0.6+0.6+0.05)/3 = 0.417 -> 1
# log, mean ln p(0) against mean ln p(1): -1.538 > -1.605 -> 0; -0.774 > -0.877 -> 0;
#                  -1.339 < -0.628 -> 1
# hard: members' picks (0, 1, 1) -> 1; (1, 0, 0) -> 0; (0, 0, 1) -> 0
WANT = {"soft": [1, 0, 1], "log": [0, 0, 1], "hard": [1, 0, 0]}


def member_logits():
    """Logits whose softmax over classes is PROBS, each (member, pixel) shifted by its own
    constant: softmax over the classes ignores the shift, a softmax over any other axis
    does not."""
    log_p = torch.tensor(PROBS, dtype=torch.float64).log()
    shift = torch.tensor([[0.0, 5.0, -3.0], [2.0, -4.0, 1.0], [-1.0, 3.0, 6.0]],
                         dtype=torch.float64)
    return (log_p + shift[..., None]).float()


@pytest.mark.parametrize("method", ["soft", "log", "hard"])
def test_each_vote_normalises_over_the_classes(method):
    assert vote(member_logits(), method).tolist() == WANT[method]


def test_the_default_vote_is_soft():
    x = member_logits()
    assert vote(x).tolist() == WANT["soft"]


def test_an_unknown_vote_names_the_choices():
    with pytest.raises(ValueError) as err:
        check_vote("median")
    assert str(err.value) == "unknown vote 'median'; use one of soft, log, hard"


def test_a_wrong_shape_names_the_shape_expected_and_got():
    with pytest.raises(ValueError) as err:
        vote(torch.zeros(2, 3), "soft")
    assert err.value.message == "expected member logits of shape (K, n, C) with K >= 1, got (2, 3)"
    with pytest.raises(ValueError, match=r"got \(0, 4, 2\)"):
        vote(torch.zeros(0, 4, 2), "soft")


@pytest.mark.parametrize("method", ["soft", "log", "hard"])
def test_the_votes_stay_on_the_logits_device(method):
    # The meta device stands in for a GPU: a vote counted on the CPU would come back there.
    labels = vote(torch.zeros(3, 5, 4, device="meta"), method)
    assert labels.device.type == "meta" and labels.shape == (5,) and labels.dtype == torch.int64

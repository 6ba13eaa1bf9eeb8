"""The torch thread count: --threads, OMP_NUM_THREADS, the measured default, and where it is
recorded."""

import pytest
import torch

from ddpmseg.core.device import DEFAULT_THREADS, set_threads
from ddpmseg.core.errors import ConfigError


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_count_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(1, "fit") == 1 and torch.get_num_threads() == 1


def test_environment_wins_over_the_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(None, "fit") == 2 and torch.get_num_threads() == 2


def test_measured_default_without_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert set_threads(None, "fit") == DEFAULT_THREADS["fit"] == torch.get_num_threads()
    # Work without a measured default keeps torch's own count.
    assert set_threads(None, "extract") == DEFAULT_THREADS["fit"]


def test_bad_counts_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="positive integer"):
        set_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        set_threads(None, "fit")

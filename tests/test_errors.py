"""The error classes."""

import pickle

import pytest

from ddpmseg.core.errors import ConfigError, FeatureOverflowError, RunError, StoreMismatchError


@pytest.mark.parametrize("cls", [ConfigError, StoreMismatchError, FeatureOverflowError,
                                 RunError])
def test_errors_pickle_with_their_hint(cls):
    """Errors cross process boundaries (dask workers) whole: type, message and hint."""
    err = pickle.loads(pickle.dumps(cls("what went wrong", "how to fix it")))
    assert type(err) is cls and err.message == "what went wrong" and err.hint == "how to fix it"
    assert str(err) == "what went wrong; how to fix it"

"""The exception hierarchy of ddpmseg.

Every error a user can cause is one of these. Each inherits the built-in it resembles, so
callers that catch ``ValueError`` or ``FileNotFoundError`` keep working, and carries a ``hint``:
how to fix it. The CLI prints ``error: <message>; <hint>`` and exits non-zero.
"""

from __future__ import annotations


class DdpmsegError(Exception):
    """Base class of every error ddpmseg raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):
        # Pickled (across dask or multiprocessing) with its hint, not just the message.
        return (type(self), (self.message, self.hint))

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(DdpmsegError, ValueError):
    """A config file or option is unknown, missing or of the wrong type."""

    exit_code = 2


class InputNotFoundError(DdpmsegError, FileNotFoundError):
    """A path the user named does not exist or holds nothing usable."""


class BadInputError(DdpmsegError, ValueError):
    """An image or mask cannot be used: wrong size, unknown labels, unreadable file."""


class CheckpointError(DdpmsegError, ValueError):
    """A checkpoint does not load into the model its flags describe."""


class StoreError(DdpmsegError, OSError):
    """A feature store is missing, corrupt, incomplete or was written by another setup."""


class StoreMismatchError(StoreError):
    """A store or run was made with another model, steps or blocks than asked for."""


class NotInStoreError(StoreMismatchError, KeyError):
    """A step and block asked of a store that has no such features (a KeyError too)."""


class StoreAccessError(StoreError):
    """An object store (s3://...) cannot be reached: no credentials, no endpoint, no bucket."""


class StaleWriterError(StoreError):
    """A task of an earlier extract attempt finds that another attempt now owns the store."""


class SchedulerLostError(DdpmsegError, ConnectionError):
    """The dask scheduler went away while a command ran (what is finished is kept)."""


class RunError(DdpmsegError, OSError):
    """A run directory is missing, incomplete or does not match its input."""


class FeatureOverflowError(DdpmsegError, OverflowError):
    """An activation does not fit the store's dtype (float16 overflow)."""


class OutputError(DdpmsegError, OSError):
    """An output folder or file cannot be written."""

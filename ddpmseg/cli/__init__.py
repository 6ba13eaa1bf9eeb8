"""The ``ddpmseg`` command line: thin click commands over the library API."""

from ddpmseg.cli.main import main

__all__ = ["main"]

"""Public names imported when first used (PEP 562): a package lists where each is defined, and
importing the package imports none of them (``import ddpmseg`` imports no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(package: str, public: Mapping[str, str],
               namespace: dict) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose public name ``n`` is
    ``public[n]``'s attribute ``n``; ``namespace``: the package's globals()."""
    def getattr_(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(public[name]), name)

    def dir_() -> list[str]:
        return sorted([*namespace, *public])

    return getattr_, dir_

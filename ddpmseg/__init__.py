"""ddpmseg: label-efficient semantic segmentation from diffusion-model features.

The library API mirrors the CLI: ``extract``, ``fit``, ``predict``, ``evaluate`` and ``demo``.
Submodules are imported on first use, so ``import ddpmseg`` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_API = {"extract": "featcache", "fit": "classifier", "predict": "predict",
        "evaluate": "evaluate", "demo": "demo", "load_config": "config"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ddpmseg' has no attribute {name!r}")

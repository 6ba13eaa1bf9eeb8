"""The pixel classifier: an ensemble of pixel MLPs trained on a feature store's labelled pixels.

``fit(store, run_dir, config)`` trains it, streaming minibatches from the store in bounded RAM;
``load_ensemble(run_dir, device)`` loads it for prediction. The run directory's layout, and its
one reader and writer, are ``run.py``.

The public names are imported when first used (PEP 562), so ``import ddpmseg.classifier.run``
(what ``verify`` reads a run with) imports no torch.
"""

# public name -> the module that defines it
_PUBLIC = {
    "fit": "ddpmseg.classifier.train",
    "PixelMLP": "ddpmseg.classifier.model",
    "simplex_etf": "ddpmseg.classifier.model",
    "EarlyStopping": "ddpmseg.classifier.model",
    "hidden_widths": "ddpmseg.classifier.model",
    "load_ensemble": "ddpmseg.classifier.ensemble",
    "Ensemble": "ddpmseg.classifier.ensemble",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ddpmseg.classifier' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

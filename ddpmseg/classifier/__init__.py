"""The pixel classifier: an ensemble of pixel MLPs trained on a feature store's labelled pixels.

``fit(store, run_dir, config)`` trains it, streaming minibatches from the store in bounded RAM;
``load_ensemble(run_dir, device)`` loads it for prediction. The run directory's layout, and its
one reader and writer, are ``run.py``.

The public names are imported when first used (PEP 562), so ``import ddpmseg.classifier.run``
(what ``verify`` reads a run with) imports no torch.
"""

from ddpmseg.core.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())

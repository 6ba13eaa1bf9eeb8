"""The pixel classifier: an ensemble of pixel MLPs trained on a feature store's labelled pixels.

``fit(store, run_dir, config)`` trains it, streaming minibatches from the store in bounded RAM;
``load_ensemble(run_dir, device)`` loads it for prediction. The run directory's layout, and its
one reader and writer, are ``run.py``.
"""

from ddpmseg.classifier.ensemble import Ensemble, load_ensemble
from ddpmseg.classifier.model import EarlyStopping, PixelMLP, hidden_widths, simplex_etf
from ddpmseg.classifier.train import fit

__all__ = ["fit", "PixelMLP", "simplex_etf", "load_ensemble", "Ensemble", "EarlyStopping",
           "hidden_widths"]

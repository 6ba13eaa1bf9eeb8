"""ddpmseg: label-efficient semantic segmentation from diffusion-model features.

The library API mirrors the CLI: ``extract``, ``fit``, ``predict``, ``evaluate``, ``report``,
``demo`` and ``load_config``. They are imported when first used (PEP 562), so ``import ddpmseg``
imports no torch.

The package's folders are the pipeline's stages; each imports only from those before it:

    core      errors, files, locks, devices, progress, the dask cluster
    spec      the features' contract (FeatureSpec, BackboneId); config, data: configs, images, masks
    backbone  diffusion models and their features; featcache: the Zarr feature store
    classifier  the pixel-MLP ensemble and its run folder
    outputs   the prediction folder, voting, pictures, evaluate, report
    interop   other tools' formats (the reference code); pipelines: extract, predict, suggest, ...
    cli       the ``ddpmseg`` command

tests/test_layers.py checks that rule on every import.
"""

from ddpmseg.core.lazy import lazy_names
from ddpmseg.core.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "extract": "ddpmseg.pipelines.extract",
    "fit": "ddpmseg.classifier.train",
    "predict": "ddpmseg.pipelines.predict",
    "evaluate": "ddpmseg.outputs.evaluate",
    "report": "ddpmseg.outputs.report",
    "demo": "ddpmseg.pipelines.demo",
    "load_config": "ddpmseg.interop.reference_config",
}

__all__ = [*_PUBLIC, "__version__"]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())

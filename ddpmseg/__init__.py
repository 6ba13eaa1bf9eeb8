"""ddpmseg: label-efficient semantic segmentation from diffusion-model features.

The library API mirrors the CLI: ``extract``, ``fit``, ``predict``, ``evaluate``, ``report`` and ``demo``.
"""

__version__ = "0.1.0"

# Bound after their submodules are imported, so ``ddpmseg.predict`` is the function, not the
# module of the same name (``importlib.import_module("ddpmseg.predict")`` gives the module).
from .classifier import fit  # noqa: E402
from .config import load_config  # noqa: E402
from .demo import demo  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .featcache import extract  # noqa: E402
from .predict import predict  # noqa: E402
from .report import report  # noqa: E402

__all__ = ["extract", "fit", "predict", "evaluate", "report", "demo", "load_config",
           "__version__"]

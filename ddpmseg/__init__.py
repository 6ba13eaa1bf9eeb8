"""ddpmseg: label-efficient semantic segmentation from diffusion-model features.

The library API mirrors the CLI: ``extract``, ``fit``, ``predict``, ``evaluate``, ``report`` and ``demo``.
"""

__version__ = "0.1.0"


def _one_line_early_interrupt() -> None:
    # Ctrl-C while the `ddpmseg` command is still importing torch and zarr (seconds) would
    # print a long traceback: before the CLI's own handler exists, say it in one line. Only
    # for the console script, never for a library user's program.
    import os
    import sys
    if os.path.basename(sys.argv[0] if sys.argv else "") != "ddpmseg":
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            sys.stderr.write("error: interrupted while starting; nothing was written\n")
            return
        previous(kind, value, tb)

    sys.excepthook = hook


_one_line_early_interrupt()

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

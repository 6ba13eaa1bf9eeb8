"""ddpmseg: label-efficient semantic segmentation from diffusion-model features.

The library API mirrors the CLI: ``extract``, ``fit``, ``predict``, ``evaluate`` and ``demo``.
"""

__version__ = "0.1.0"

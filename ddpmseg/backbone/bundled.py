"""What ships inside the package: the demo images and the small face backbone."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_DATA = ASSETS / "demo"
# Checkpoint names a config may give instead of a path.
BUNDLED_CHECKPOINTS = {"bundled:faces_64": ASSETS / "adm_faces64_fp16.pt"}
# The model preset each bundled checkpoint is built with.
BUNDLED_PRESETS = {"bundled:faces_64": "faces_64"}


def resolve_checkpoint(value: str | Path) -> Path:
    """A path, or ``bundled:faces_64`` for the small face backbone that ships with ddpmseg."""
    return BUNDLED_CHECKPOINTS.get(str(value), Path(value))

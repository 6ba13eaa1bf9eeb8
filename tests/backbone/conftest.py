"""Where the shared fixtures live: ../shared beside the repository root (not part of the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def find_shared_dir() -> Path | None:
    """The shared folder (fixtures, backbones), or None where this checkout has none beside it."""
    path = SHARED.resolve()
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared_dir()
    if path is None:
        pytest.skip(f"shared fixtures folder not found at {SHARED} (it sits beside the repo root)")
    return path


@pytest.fixture(scope="session")
def adm_dir(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "adm"
    if not path.is_dir():
        pytest.skip(f"ADM parity fixtures not found at {path}")
    return path

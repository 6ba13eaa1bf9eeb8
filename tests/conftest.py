"""Shared fixtures: where ../shared is, and skipping with a clear reason when it is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: parity fixtures and benchmark data live there")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    path = shared_dir / "fixtures" / "adm"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path

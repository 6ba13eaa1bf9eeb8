"""Shared fixtures: where ../shared is, and skipping with a clear reason when it is absent.

Tests that need only face images and a backbone use the ones bundled in ddpmseg/assets and run
anywhere. Parity and real-data tests need ../shared: without it they skip, except under
``CI=true`` (CI always has ../shared), where its absence fails them.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def skip_without_shared(reason: str):
    """Skip for want of something in ../shared; under CI=true, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: ../shared must be complete)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing_shared():
    """``missing_shared(reason)``: skip (fail under CI=true) when part of ../shared is absent."""
    return skip_without_shared


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        skip_without_shared(f"{SHARED} is absent: parity fixtures and benchmark data live there")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    path = shared_dir / "fixtures" / "adm"
    if not path.is_dir():
        skip_without_shared(f"{path} is absent")
    return path


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI points the root logger at CliRunner's stream, which is closed after each invoke."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is faster, and immune to a busy machine's load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_HOLD = """
import sys
from ddpmseg.locking import writer_lock
with writer_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def hold_lock():
    """hold_lock(path, what) -> pid: another process holds ``path``'s writer lock until the
    returned release() is called (or the test ends)."""
    procs = []

    def hold(target, what="prediction folder"):
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(target), what],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"

        def release():
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        hold.release = release
        return proc.pid

    yield hold
    for proc in procs:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(timeout=30)


def skip_where_not_allowed(reason: str):
    """Skip for want of something this machine does not allow (mounting a tmpfs); under
    CI=true, fail instead: CI runs every check."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this check must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def tiny_disk(tmp_path):
    """tiny_disk(kb) -> a folder on a tmpfs of ``kb`` kB: a disk that fills up. Skipped,
    saying why, where mounting is not permitted (failed under CI=true);
    ``tiny_disk.grow(path, kb)`` remounts it bigger."""
    mounts = []

    def mount(*args):
        try:
            return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        except OSError as exc:
            return subprocess.CompletedProcess(args, 1, "", str(exc))

    def make(kb: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = mount("-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", where)
        if done.returncode != 0:
            skip_where_not_allowed(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounts.append(where)
        return where

    def grow(where: Path, kb: int) -> None:
        assert mount("-o", f"remount,size={kb}k", where).returncode == 0

    make.grow = grow
    yield make
    for where in mounts:
        # lazily: a failed test may still hold a file open there
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

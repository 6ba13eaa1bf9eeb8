"""Shared fixtures: where ../shared is, and skipping with a clear reason when it is absent.

Tests that need only face images and a backbone use the ones bundled in ddpmseg/assets and run
anywhere. Parity and real-data tests need ../shared: without it they skip, except under
``CI=true`` (CI always has ../shared), where its absence fails them.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import need

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
from ddpmseg.core.locking import writer_lock
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
            need(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounts.append(where)
        return where

    def grow(where: Path, kb: int) -> None:
        assert mount("-o", f"remount,size={kb}k", where).returncode == 0

    make.grow = grow
    yield make
    for where in mounts:
        # lazily: a failed test may still hold a file open there
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# A dask worker preload: every image write of an extraction task first waits while the file
# ``hold`` exists in $DDPMSEG_GATE (announcing itself with ``arrived-<i>``), then records how
# the write ended (``wrote-<i>`` or ``refused-<i>`` holding the error). Tests use it to stop
# a task at a known point instead of sleeping.
_GATE = """
import os, pathlib, time
from ddpmseg.pipelines import extract as extraction

_gate = pathlib.Path(os.environ["DDPMSEG_GATE"])
# dask may run a preload twice: wrap the original function, never the wrapper.
_write_one = getattr(extraction, "_ungated_write_one", extraction._write_one)
extraction._ungated_write_one = _write_one


def _gated(store, i, *args):
    (_gate / f"arrived-{i}").touch()
    while (_gate / "hold").exists():
        time.sleep(0.01)
    try:
        out = _write_one(store, i, *args)
    except BaseException as exc:
        tmp = _gate / f".refused-{i}"
        tmp.write_text(f"{type(exc).__name__}: {exc}")
        tmp.rename(_gate / f"refused-{i}")
        raise
    (_gate / f"wrote-{i}").touch()
    return out


extraction._write_one = _gated
"""


class TcpCluster:
    """A real ``dask scheduler`` and ``dask worker`` (one thread, no nanny) on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.gate = root / "gate"
        self.gate.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""
        self.logs: list = []

    def _log(self, name: str):
        fh = open(self.root / f"{name}.log", "w")
        self.logs.append(fh)
        return fh

    def start(self, timeout: float = 60) -> "TcpCluster":
        import json
        sfile = self.root / "scheduler.json"
        (self.root / "gate.py").write_text(_GATE)
        env = {**os.environ, "DDPMSEG_GATE": str(self.gate)}
        self.procs["scheduler"] = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(sfile)],
            stdout=subprocess.DEVNULL, stderr=self._log("scheduler"))
        # The worker runs in a folder of its own: relative paths must not resolve there.
        (self.root / "worker").mkdir()
        self.procs["worker"] = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(sfile),
             "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0",
             "--preload", str(self.root / "gate.py")],
            cwd=self.root / "worker", env=env, stdout=subprocess.DEVNULL,
            stderr=self._log("worker"))
        from distributed import Client
        with Client(scheduler_file=str(sfile), timeout=timeout) as client:
            client.wait_for_workers(1, timeout=timeout)
            self.address = client.scheduler.address
            self.worker = next(iter(client.scheduler_info()["workers"]))
        assert json.loads(sfile.read_text())["address"] == self.address
        return self

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)

    def stop(self) -> None:
        for name in ("worker", "scheduler"):
            if name in self.procs:
                self.kill(name)
        for fh in self.logs:
            fh.close()


@pytest.fixture
def tcp_cluster(tmp_path):
    """A started TcpCluster (``.address``, ``.worker``, ``.gate``); killed by pid at the end.
    dask is a dependency: under CI=true a cluster that does not start fails the test."""
    cluster = TcpCluster(tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# -- markers (registered in pyproject.toml) ----------------------------------------------------
# Browser, distributed and fault tests are slow too, so `pytest -m "not slow"` is the quick run.
_SLOW_KINDS = ("browser", "distributed", "fault")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in _SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def two_faces(tmp_path_factory):
    """Two bundled demo faces (64px) with their masks, in a folder of their own (read only)."""
    from ddpmseg.backbone.bundled import DEMO_DATA

    root = tmp_path_factory.mktemp("two_faces")
    for npy in sorted((DEMO_DATA / "train").glob("*.npy"))[:2]:
        shutil.copy(npy, root)
        shutil.copy(npy.with_suffix(".png"), root)
    return root

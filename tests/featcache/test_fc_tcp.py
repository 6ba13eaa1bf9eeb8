"""Extraction against a real ``dask scheduler`` and ``dask worker`` on 127.0.0.1 (the
``tcp_cluster`` fixture of tests/conftest.py): orphaned tasks, relative paths, a lost
scheduler. The worker's image writes pass a gate the test controls (no sleeps as
synchronisation)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from distributed import Client

from ddpmseg.core.errors import InputNotFoundError
from ddpmseg.featcache import FeatureStore
from ddpmseg.pipelines.extract import extract
from ddpmseg.pipelines import extract as extraction
from ddpmseg.pipelines.verify import verify_store

CLI = [sys.executable, "-c", "from ddpmseg.cli.main import main; main()"]
pytestmark = pytest.mark.distributed

SMALL = ["--config", "faces64_ffhq_34", "--steps", "10", "--blocks", "2", "--images-per-batch", "1",
         "--device", "cpu", "--no-progress"]


def wait_for(what, ready, proc=None, timeout: float = 60):
    """Poll ``ready()`` (a file the worker writes) until true; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def arrived(gate) -> list[str]:
    return sorted(p.name.split("-")[1] for p in gate.glob("arrived-*"))


def start_extract(data, store, address, *extra, cwd=None):
    return subprocess.Popen([*CLI, "extract", str(data), str(store), *SMALL,
                             "--scheduler", address, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def small_config(seed: int = 0):
    from ddpmseg import load_config
    return load_config("faces64_ffhq_34").replace(
        features={"steps": (10,), "blocks": (2,), "seed": seed, "images_per_batch": 1})


def test_orphaned_task_does_not_write_into_the_rerun_store(tcp_cluster, faces_dir, tmp_path,
                                                            helpers):
    store = tmp_path / "s.zarr"
    (tcp_cluster.gate / "hold").touch()
    proc = start_extract(faces_dir, store, tcp_cluster.address)
    try:
        wait_for("an image write on the worker", lambda: arrived(tcp_cluster.gate), proc)
    finally:
        proc.kill()
        proc.communicate()
    i = arrived(tcp_cluster.gate)[0]
    # The client is gone (and its lock with it); its task still waits on the worker. A rerun
    # with another seed replaces the store.
    extract(faces_dir, store, small_config(seed=1), device="cpu", overwrite=True,
            progress=False)
    before = helpers.tree_bytes(store)
    (tcp_cluster.gate / "hold").unlink()
    wait_for("the orphaned write's end", lambda: any(
        (tcp_cluster.gate / f"{end}-{i}").exists() for end in ("wrote", "refused")))
    assert not (tcp_cluster.gate / f"wrote-{i}").exists()
    said = (tcp_cluster.gate / f"refused-{i}").read_text()
    assert said.startswith("StaleWriterError: ") and "another extract" in said, said
    assert helpers.tree_bytes(store) == before
    assert verify_store(store) == []


def test_relative_paths_reach_the_worker_absolute(tcp_cluster, faces_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(faces_dir.parent)
    extract(faces_dir.name, "rel.zarr", small_config(), device="cpu",
            scheduler=tcp_cluster.address, progress=False)
    store = FeatureStore.open(tmp_path / "rel.zarr")
    assert store.complete().all() and len(store) == 4
    assert verify_store(store.path) == []


def test_worker_that_cannot_see_a_path_names_itself_and_the_path(tcp_cluster, tmp_path):
    gone = tmp_path / "elsewhere" / "s.zarr"
    job = extraction._Job(str(gone), (str(tmp_path / "img.png"),), None, 1, False)
    with Client(tcp_cluster.address, timeout=30) as client:
        fut = client.submit(extraction._dask_task, job, {}, [0], [None], pure=False)
        with pytest.raises(InputNotFoundError) as err:
            fut.result(timeout=60)
    line = str(err.value)
    assert "\n" not in line
    assert f"worker {tcp_cluster.worker}" in line and str(gone) in line, line


def test_scheduler_killed_mid_extract_is_one_error_line(tcp_cluster, faces_dir, tmp_path):
    store = tmp_path / "s.zarr"
    (tcp_cluster.gate / "hold").touch()
    proc = start_extract(faces_dir, store, tcp_cluster.address)
    try:
        wait_for("an image write on the worker", lambda: arrived(tcp_cluster.gate), proc)
        tcp_cluster.kill("scheduler")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
    assert tcp_cluster.address in lines[-1] and "rerun" in lines[-1], err
    assert not [ln for ln in lines if "distributed" in ln], err


def test_fit_on_tcp_with_relative_store_path(tcp_cluster, synthetic_dir, fake_config,
                                             fake_backbone, tmp_path, monkeypatch):
    from ddpmseg.classifier import run as run_folder
    from ddpmseg.classifier.train import fit
    from ddpmseg.config import ClassifierConfig, Config
    extract(synthetic_dir, tmp_path / "s.zarr", fake_config, backbone=fake_backbone(),
            progress=False)
    cfg = Config(classifier=ClassifierConfig(ensemble=1, max_epochs=1, min_epochs=1,
                                             pixels_per_batch=64, seed=0))
    monkeypatch.chdir(tmp_path)
    run = fit("s.zarr", "run", cfg, device="cpu", scheduler=tcp_cluster.address,
              progress=False)
    assert run_folder.trained_members(tmp_path / run, 1) == [0]

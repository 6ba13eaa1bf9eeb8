"""The CI-sized subset of the fault harness (bench/faults.py): a few kills of extract and fit,
each kind of corruption once, one pair of concurrent writers, a full disk where a tmpfs can be
mounted, and one of each issue-22 kind (orphaned dask task, symlink alias, predict killed over
a prediction, evaluate on a partial folder, ENOSPC in fit and predict, EXIF photo, masks under
other names). Nothing may end silently wrong, in a traceback or with data lost; under CI=true a
kind that cannot run here fails the run (bench/faults.py's ``unavailable``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "bench" / "faults.py"


def _harness():
    spec = importlib.util.spec_from_file_location("ddpmseg_bench_faults", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.fault
def test_fault_harness_subset(tmp_path):
    faults = _harness()
    result = faults.run(faults.QUICK, tmp_path, images=2, seed=1)
    table = result["table"]
    for kind, n in faults.QUICK.items():
        if kind in result["skipped"]:
            continue
        assert table[kind]["injected"] == n, (kind, table[kind])
    assert sum(row["silent"] for row in table.values()) == 0, result["examples"]
    assert sum(row["traceback"] for row in table.values()) == 0, result["examples"]
    assert sum(row["lost"] for row in table.values()) == 0, result["examples"]
    # Corruption is never "harmless" here: each damaged store or member was refused in one
    # line and then repaired to the original (a chunk flip could only pass if the crc32c did).
    for kind in ("chunk_flip", "flag_flip", "member_flip"):
        assert table[kind]["refused"] == faults.QUICK[kind], (kind, table[kind])


# Loaded by the child's site.py (its folder is first on PYTHONPATH): the first import of torch
# sends the process a SIGINT, so the interrupt lands during the imports every time, whatever
# the machine's speed, after ddpmseg's package root has started.
_INTERRUPT_AT_TORCH = """
import os, signal, sys


class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, _Interrupt())
"""


def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path):
    # `ddpmseg --help` imports no torch; a command imports it (seconds) once it runs, inside
    # the CLI's own handler: Ctrl-C there is one line and exit code 130, nothing written.
    import os
    import signal
    import subprocess
    import sys

    import pytest

    script = Path(sys.executable).with_name("ddpmseg")
    if not script.is_file():
        pytest.skip("the ddpmseg console script is not installed beside this interpreter")
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_AT_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(HARNESS.parents[1])])}
    # The child's SIGINT disposition is set, not inherited: under a parent that ignores SIGINT
    # (a shell's background job) Python would never install its handler. This test always
    # spawns it from such a parent, so it passes or fails alike wherever pytest runs.
    store = tmp_path / "s.zarr"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([str(script), "extract", str(tmp_path / "absent"), str(store),
                                 "--num-classes", "2"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        signal.signal(signal.SIGINT, before)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert err == "error: interrupted; rerun the same command to resume\n"
    assert not store.exists()


def test_a_kind_that_cannot_run_fails_under_ci(tmp_path, monkeypatch):
    import subprocess

    import pytest

    faults = _harness()
    h = faults.Harness(tmp_path, images=1, seed=0)
    denied = subprocess.CompletedProcess(["mount"], 32, "", "mount: permission denied")
    monkeypatch.setattr(faults.subprocess, "run", lambda *a, **k: denied)
    monkeypatch.setenv("CI", "false")
    h.disk_full()  # a skip, saying why, outside CI
    assert h.skipped == {"disk_full": "cannot mount a tmpfs here (mount: permission denied)"}
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="disk_full cannot run here under CI=true"):
        h.disk_full()

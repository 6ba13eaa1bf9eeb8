"""bench/gpu_check.py in its CI-sized CPU form: it runs, and its figures are what it says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-W", "error", str(REPO / "bench" / "gpu_check.py"),
                          "--cpu", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu"
    faces = next(p for p in r["parity"] if p["model"] == "faces_64")
    # Judged against something other than itself: a float64 run of the same weights (float32
    # differs from it, within the bound); bf16 autocast differs more but stays close.
    assert faces["reference"] == "float64"
    assert 0 < faces["fp32"]["max_abs_diff"] < 1e-4 and faces["fp32"]["within_1e-4"] is True
    assert 0 < faces["bf16"]["max_rel_l2"] < 0.05 and "fp16" not in faces
    # With ../shared: the 64 px fixture against the activations of the original code.
    fixture = [p for p in r["parity"] if p["model"] == "adm_tiny64_cosine"]
    if (REPO.parent / "shared" / "fixtures" / "adm" / "adm_tiny64_cosine.json").is_file():
        assert fixture[0]["reference"] == "guided-diffusion"
        assert fixture[0]["fp32"]["within_1e-4"] is True
    else:
        assert fixture == []
    e = r["extraction"]
    assert e["images"] == 2 and e["images_per_s"] > 0 and e["gpu_busy"] is None
    assert 0 < e["model_share"] <= 1
    f = r["fit"]
    assert f["labelled_pixels"] == 2 * 16 * 16   # a 16 x 16 labelled square per image
    assert f["streaming_pixels_per_s"] > 0 and f["in_memory_pixels_per_s"] > 0
    assert r["predict"]["image_size"] == [32, 32] and r["predict"]["k10_peak_gpu_bytes"] is None
    # one table on stdout, a row per check
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * len(r["parity"]) + 1 + 1 + 2
    assert any("faces_64, cpu vs float64, fp32" in line and "(pass)" in line for line in table)

"""Issue 25 on the classifier side: fit leaves the caller's global state alone (random
generators, torch's thread count), the run folder has one writer of its files (run.py), and
reading a run or a TOML config imports no torch."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpmseg.classifier import fit, load_ensemble
from ddpmseg.classifier import run as run_folder
from ddpmseg.core.errors import BadInputError
from ddpmseg.core.fileio import atomic_write, is_temporary


def _rng_states():
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()


def _weights(run):
    return [{k: v.clone() for k, v in m.state_dict().items()}
            for m in load_ensemble(run, "cpu").members]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_fit_leaves_the_callers_random_state_alone(store_path, small_config, tmp_path):
    """fit used to seed random, numpy and torch globally with seed + k: a caller's own draws
    after a fit depended on the fit's seed. Members still come from seed + k."""
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = _rng_states()
    for etf in ("none", "separate"):
        fit(store_path, tmp_path / etf, small_config(ensemble=2, max_epochs=1, etf=etf),
            device="cpu", progress=False)
    after = _rng_states()
    assert after[0] == before[0] and after[1] == before[1] and torch.equal(after[2], before[2])
    # The same members from any global state.
    torch.manual_seed(7)
    fit(store_path, tmp_path / "again", small_config(ensemble=2, max_epochs=1, etf="separate"),
        device="cpu", progress=False)
    assert _same(_weights(tmp_path / "again"), _weights(tmp_path / "separate"))


def test_fit_threads_apply_while_it_trains_and_are_restored(store_path, small_config,
                                                            tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fit(store_path, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
            progress=False, threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    meta = run_folder.read_member(run_folder.member_path(tmp_path / "run", 0))["meta"]
    assert meta["threads"] == 2


def test_overwrite_starts_over_and_resume_false_still_does(store_path, small_config, tmp_path):
    run = tmp_path / "run"
    fit(store_path, run, small_config(ensemble=1, max_epochs=1), device="cpu", progress=False)
    (run / "train_log.jsonl").write_text("old\n")
    fit(store_path, run, small_config(ensemble=1, max_epochs=1), device="cpu", progress=False,
        overwrite=True)
    assert "old" not in (run / "train_log.jsonl").read_text()
    (run / "train_log.jsonl").write_text("old\n")
    fit(store_path, run, small_config(ensemble=1, max_epochs=1), device="cpu", progress=False,
        resume=False)  # the old spelling, kept for one release
    assert "old" not in (run / "train_log.jsonl").read_text()


def test_clear_deletes_the_run_and_temporaries_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ["config.json", "store.json", "member_00.pt", "member_12.pt", "train_log.jsonl",
             "manifest.json", ".member_03.pt.4242.tmp", "notes.txt", "member_x.txt"]
    for name in names:
        (run / name).write_text("x")
    run_folder.clear(run)
    assert sorted(p.name for p in run.iterdir()) == ["member_x.txt", "notes.txt"]


def test_temporary_names_are_the_ones_atomic_write_uses(tmp_path):
    seen = []
    atomic_write(tmp_path / "member_00.pt", lambda p: (seen.append(p), p.write_text("x")))
    assert is_temporary(seen[0]) and not is_temporary(tmp_path / "member_00.pt")


def test_features_of_the_wrong_width_are_a_bad_input(store_path, small_config, tmp_path):
    fit(store_path, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
        progress=False)
    ens = load_ensemble(tmp_path / "run", "cpu")
    with pytest.raises(BadInputError, match=rf"features must be \(n, {ens.feature_dim}\)"):
        ens.probs(np.zeros((3, ens.feature_dim + 1), np.float32))


def _imports_torch(code: str) -> bool:
    check = f"{code}; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


def test_reading_a_run_imports_no_torch():
    """``verify`` reads a run's header and manifest through run.py: torch is imported only
    where a member is read or written."""
    if _imports_torch("import ddpmseg.featcache.store, ddpmseg.featcache.content"):
        pytest.skip("the feature store's modules still import torch (featcache's part)")
    assert not _imports_torch("import ddpmseg.classifier.run")


def test_a_toml_config_through_interop_imports_no_torch():
    # A ddpm.json builds a UNet on the meta device to check dim; a TOML config needs no torch.
    assert not _imports_torch("from ddpmseg.interop.reference_config import load_config; "
                              "load_config('ffhq_34'); load_config(None)")

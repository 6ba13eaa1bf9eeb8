import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpmseg.classifier import fit, load_ensemble
from ddpmseg.classifier import sampler
from ddpmseg.classifier.model import PixelMLP, init_normal, make_trunk
from ddpmseg.core.errors import RunError, StoreError
from ddpmseg.featcache.store import FeatureStore


def _weights(run):
    ens = load_ensemble(run, "cpu")
    return [m.state_dict() for m in ens.members]


def _same(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _accuracy(store, run):
    ens = load_ensemble(run, "cpu")
    right = total = 0
    for i in range(len(store)):
        lab = store.labels(i)
        ys, xs = np.nonzero(lab != store.info.ignore_label)
        mean = torch.stack(ens.probs(store.pixel_features(i, ys, xs))).mean(0)
        right += int((mean.argmax(1).numpy() == lab[ys, xs]).sum())
        total += len(ys)
    return right / total


@pytest.mark.slow
def test_fit_separates_classes_and_writes_a_run(store_path, small_config, tmp_path):
    run = fit(store_path, tmp_path / "run", small_config(ensemble=2, max_epochs=8),
              device="cpu", progress=False)
    assert {"config.json", "store.json", "member_00.pt", "member_01.pt", "train_log.jsonl"} <= {
        p.name for p in run.iterdir()}
    store = FeatureStore.open(store_path)
    assert _accuracy(store, run) >= 0.99
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["num_classes"] == 3 and cfg["classifier"]["ensemble"] == 2
    stored = json.loads((run / "store.json").read_text())
    assert stored["info"]["fingerprint"] == store.info.fingerprint
    lines = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch" in r]
    assert epochs and all(r["pixels_per_s"] > 0 and r["steps"] > 0 for r in epochs)
    assert sorted(r["member"] for r in lines if r.get("done")) == [0, 1]
    ens = load_ensemble(run, "cpu")
    assert len(ens.members) == 2 and not any(m.training for m in ens.members)
    assert ens.info.steps == store.info.steps and ens.info.shapes == store.info.shapes
    x = np.zeros((5, store.info.feature_dim), np.float16)
    logits, probs = ens.logits(x), ens.probs(x)
    assert len(logits) == 2 and logits[0].shape == (5, 3)
    assert torch.allclose(probs[1].sum(1), torch.ones(5))
    # A finished run is not retrained.
    mtime = (run / "member_00.pt").stat().st_mtime_ns
    fit(store_path, run, small_config(ensemble=2, max_epochs=8), device="cpu", progress=False)
    assert (run / "member_00.pt").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_etf_modes(store_path, small_config, tmp_path, one_thread):
    runs = {mode: fit(store_path, tmp_path / mode, small_config(ensemble=1, etf=mode),
                      device="cpu", progress=False) for mode in ("none", "shared", "separate")}
    w = {mode: _weights(run)[0] for mode, run in runs.items()}
    # shared: the ETF loss reads the classifier's own penultimate features -> other weights.
    assert not torch.equal(w["shared"]["layers.0.weight"], w["none"]["layers.0.weight"])
    # separate (the seed's variant): its own trunk, nothing shared -> the same classifier.
    assert _same([w["separate"]], [w["none"]])
    x = FeatureStore.open(store_path).pixel_features(0, np.arange(32), np.arange(32))
    a = load_ensemble(runs["separate"], "cpu").logits(x)[0]
    b = load_ensemble(runs["none"], "cpu").logits(x)[0]
    assert torch.equal(a, b)


def _epoch_records(run):
    lines = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in lines if "epoch" in r]


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_the_loss_is_ce_plus_weight_times_the_etf_ce(store_path, small_config, tmp_path, mode,
                                                     hand_etf, hand_ce, one_thread):
    """One step over every labelled pixel, at member 0's initial weights (seed 0): the logged
    losses are the hand computation's. loss = CE(logits, y) + w CE(h M, y), h the penultimate
    features (shared) or the separate trunk's (separate), M the seed's simplex ETF."""
    store = FeatureStore.open(store_path)
    index = sampler.PixelIndex.from_store(store)
    x = sampler.InMemorySource(store, index, torch.device("cpu")).x
    y = index.labels.astype(np.int64)
    weight = 0.7  # neither the default 0.4 nor 1
    cfg = small_config(ensemble=1, max_epochs=1, pixels_per_batch=len(y), etf=mode, etf_weight=weight)
    (rec,) = _epoch_records(fit(store_path, tmp_path / "run", cfg, device="cpu", progress=False))
    assert rec["steps"] == 1 and rec["pixels"] == len(y)
    torch.manual_seed(0)  # member 0's draws: the classifier, then the separate trunk
    model = PixelMLP(x.shape[1], 3).train()
    trunk = make_trunk(x.shape[1], model.widths).train()
    init_normal(trunk)
    with torch.no_grad():
        logits, h = model(x, return_features=True)
        if mode == "separate":
            h = trunk(x)
    ce = hand_ce(logits.double().numpy(), y)
    etf = hand_ce(h.double().numpy() @ hand_etf(model.widths[1], 3, 0), y)
    assert rec["ce"] == pytest.approx(ce, rel=1e-5)
    assert rec["etf_loss"] == pytest.approx(etf, rel=1e-5)
    assert rec["loss"] == pytest.approx(ce + weight * etf, rel=1e-5)
    assert etf > 0.1 and abs(etf - ce) > 1e-3  # the two terms are told apart


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_etf_weight_zero_trains_what_none_trains(store_path, small_config, tmp_path, mode,
                                                 one_thread):
    # A dozen steps of 512 pixels: enough for any ETF gradient to move the weights.
    runs = [fit(store_path, tmp_path / name,
                small_config(ensemble=1, max_epochs=2, pixels_per_batch=512, etf=etf, etf_weight=w),
                device="cpu", progress=False)
            for name, etf, w in (("zero", mode, 0.0), ("none", "none", 0.4))]
    assert _same(_weights(runs[0]), _weights(runs[1]))
    assert [r["ce"] for r in _epoch_records(runs[0])] == \
        [r["ce"] for r in _epoch_records(runs[1])]


@pytest.mark.slow
def test_streaming_and_in_memory_fit_the_same_ensemble(store_path, small_config, tmp_path):
    # A budget that holds every image's maps but not the dense features: the resident pool.
    cfg = small_config(ensemble=1, max_epochs=3, ram_budget_gb=1e-4)
    a = fit(store_path, tmp_path / "stream", cfg, device="cpu", progress=False)
    b = fit(store_path, tmp_path / "memory", cfg, device="cpu", in_memory=True, progress=False)
    assert _same(_weights(a), _weights(b))
    # With a budget of two images: one-image chunks, double-buffered, loaded in the background.
    cfg = small_config(ensemble=1, max_epochs=3, ram_budget_gb=1.5e-5)
    c = fit(store_path, tmp_path / "stream2", cfg, device="cpu", progress=False)
    d = fit(store_path, tmp_path / "memory2", cfg, device="cpu", in_memory=True, progress=False)
    meta = torch.load(c / "member_00.pt", weights_only=True)["meta"]
    assert meta["shuffle_images"] == 1
    assert _same(_weights(c), _weights(d))


_KILL_SCRIPT = """
import sys
from ddpmseg.classifier import fit
from ddpmseg.config import ClassifierConfig, Config
cfg = Config(classifier=ClassifierConfig(ensemble=3, max_epochs=6, min_epochs=3, patience=1000))
fit(sys.argv[1], sys.argv[2], cfg, device="cpu", progress=False)
"""


def _manifest_text(run) -> str:
    try:
        return (run / "manifest.json").read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(store_path, tmp_path):
    from ddpmseg.config import ClassifierConfig, Config

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store_path), str(run)])
    try:
        deadline = time.time() + 120
        # Killed once member 0 is recorded in the manifest (a member file the manifest does not
        # list yet is retrained, and there would be nothing to resume).
        while "member_00.pt" not in _manifest_text(run):
            assert proc.poll() is None, "fit exited before member 0 was written"
            assert time.time() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "member_02.pt").exists()  # the kill really interrupted the fit
    cfg = Config(classifier=ClassifierConfig(ensemble=3, max_epochs=6, min_epochs=3, patience=1000))
    fit(store_path, run, cfg, device="cpu", progress=False)
    whole = fit(store_path, tmp_path / "whole", cfg, device="cpu", progress=False)
    assert _same(_weights(run), _weights(whole))
    assert not list(run.glob(".*tmp"))
    log = (run / "train_log.jsonl").read_text()
    assert '"event": "resume"' in log


def test_refuses_a_run_dir_of_another_store(store_path, small_config, make_store, tmp_path):
    cfg = small_config(ensemble=1, max_epochs=1)
    run = fit(store_path, tmp_path / "run", cfg, device="cpu", progress=False)
    other = make_store(tmp_path / "other.zarr", steps=(10, 30), fingerprint={"sha256": "0" * 64})
    with pytest.raises(RunError) as err:
        fit(other, run, cfg, device="cpu", progress=False)
    msg = str(err.value)
    assert "another store" in msg and "steps (10,30 now, 10,20 in the run" in msg
    assert "checkpoint sha256 (000000000000... now, ffffffffffff... in the run" in msg
    assert "`overwrite=True`" in msg and "new run dir" in msg
    # Other classifier settings on top of trained members are refused too...
    with pytest.raises(RunError, match="lr"):
        fit(store_path, run, small_config(ensemble=2, max_epochs=1, lr=0.01), device="cpu",
            progress=False)
    # ...and --overwrite (resume=False) starts over.
    fit(other, run, cfg, device="cpu", resume=False, progress=False)
    assert load_ensemble(run, "cpu").info.steps == (10, 30)


def test_a_run_records_its_rounding_and_resumes_only_with_it(store_path, small_config,
                                                             make_store, tmp_path):
    """A lossy codec's rounding is part of the features: resuming a run trained on a lossless
    store from a bitround3 store (same images otherwise) is refused like any other contract
    difference, and a run trained on the bitround3 store records its rounding."""
    cfg = small_config(ensemble=1, max_epochs=1)
    run = fit(store_path, tmp_path / "run", cfg, device="cpu", progress=False)
    lossy = make_store(tmp_path / "lossy.zarr", codec="bitround3")
    with pytest.raises(RunError) as err:
        fit(lossy, run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    assert "differs in rounding (bitround3 now, lossless in the run's store)" in str(err.value)
    assert len(load_ensemble(run, "cpu")) == 1 and not (run / "member_01.pt").exists()
    assert load_ensemble(run, "cpu").info.spec.keepbits is None
    lossy_run = fit(lossy, tmp_path / "lossy_run", cfg, device="cpu", progress=False)
    assert load_ensemble(lossy_run, "cpu").info.spec.keepbits == 3
    assert json.loads((lossy_run / "store.json").read_text())["info"]["codec"]["keepbits"] == 3
    fit(lossy, lossy_run, small_config(ensemble=2, max_epochs=1), device="cpu", progress=False)
    assert len(load_ensemble(lossy_run, "cpu")) == 2


def test_the_run_records_the_feature_spec_once_and_reads_older_runs(store_path, small_config,
                                                                   tmp_path):
    cfg = small_config(ensemble=2, max_epochs=1)
    run = fit(store_path, tmp_path / "run", cfg.replace(classifier={"ensemble": 1}),
              device="cpu", progress=False)
    store = FeatureStore.open(store_path)
    written = json.loads((run / "config.json").read_text())
    assert "features" not in written  # the spec is store.json's, once
    assert load_ensemble(run, "cpu").config.features.steps == store.info.steps
    # A run written before carried the features in config.json too (other values here, to
    # show they are not read): it loads, and resumes with the next member.
    written["features"] = {"steps": [1], "blocks": [2], "seed": 9, "dtype": "float32",
                           "precision": "fp32", "batch_size": 1}
    (run / "config.json").write_text(json.dumps(written))
    (run / "manifest.json").unlink()  # older runs had no manifest of checksums
    ens = load_ensemble(run, "cpu")
    assert ens.config.features.steps == store.info.steps and ens.config.features.seed == 0
    fit(store_path, run, cfg, device="cpu", progress=False)
    assert len(load_ensemble(run, "cpu")) == 2


def test_refuses_stores_without_labels_or_unfinished(make_store, small_config, tmp_path):
    cfg = small_config(ensemble=1, max_epochs=1)
    nolab = make_store(tmp_path / "nolab.zarr", labels=False)
    with pytest.raises(StoreError, match="no labels"):
        fit(nolab, tmp_path / "r1", cfg, device="cpu", progress=False)
    partial = make_store(tmp_path / "partial.zarr", complete=False)
    with pytest.raises(StoreError, match="extract"):
        fit(partial.path, tmp_path / "r2", cfg, device="cpu", progress=False)


def test_load_ensemble_of_an_unfinished_run(store_path, small_config, tmp_path):
    run = fit(store_path, tmp_path / "run", small_config(ensemble=2, max_epochs=1),
              device="cpu", progress=False)
    (run / "member_01.pt").unlink()
    with pytest.raises(RunError, match="not trained"):
        load_ensemble(run, "cpu")
    with pytest.raises(RunError, match="not a ddpmseg run"):
        load_ensemble(tmp_path, "cpu")


@pytest.mark.distributed
def test_dask_members_equal_sequential(store_path, small_config, tmp_path):
    cfg = small_config(ensemble=2, max_epochs=2)
    seq = fit(store_path, tmp_path / "seq", cfg, device="cpu", progress=False)
    par = fit(store_path, tmp_path / "par", cfg, device="cpu", progress=False,
              scheduler="local:2")
    assert _same(_weights(seq), _weights(par))
    done = [json.loads(l) for l in (par / "train_log.jsonl").read_text().splitlines()]
    assert sorted(r["member"] for r in done if r.get("done")) == [0, 1]


def test_bad_scheduler_is_a_config_error(store_path, small_config, tmp_path):
    from ddpmseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduler"):
        fit(store_path, tmp_path / "run", small_config(ensemble=1, max_epochs=1), device="cpu",
            progress=False, scheduler="bogus")


def test_bad_classifier_settings_are_config_errors(store_path, small_config, tmp_path):
    from ddpmseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="etf"):
        fit(store_path, tmp_path / "run", small_config(etf="both"), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="pixels_per_batch"):
        fit(store_path, tmp_path / "run", small_config(pixels_per_batch=1), device="cpu",
            progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_the_gpu(store_path, small_config, tmp_path):
    cfg = small_config(ensemble=1, max_epochs=3)
    gpu = fit(store_path, tmp_path / "gpu", cfg, device="cuda", progress=False)
    mem = fit(store_path, tmp_path / "gpu_mem", cfg, device="cuda", in_memory=True,
              progress=False)
    store = FeatureStore.open(store_path)
    assert _accuracy(store, gpu) >= 0.95
    ens = load_ensemble(gpu, "cuda")
    assert ens.members[0].layers[0].weight.is_cuda
    # Streaming (pool on the GPU) and in-memory (rows moved per batch) agree there too.
    a, b = _weights(gpu), _weights(mem)
    assert all(torch.allclose(a[0][k].float(), b[0][k].float(), atol=1e-4) for k in a[0])


def test_a_config_of_other_classes_is_refused_before_writing(store_path, tmp_path):
    from ddpmseg import load_config
    from ddpmseg.core.errors import ConfigError

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"config cat_15 has 15 classes .* but store .*small"
                                          r"\.zarr has 3 classes"):
        fit(store_path, run, load_config("cat_15"), device="cpu", progress=False)
    assert not run.exists()

"""Training-loop checks that kill mutants the older tests let through (bench/mutation.py)."""

import json

from ddpmseg.classifier import fit
from ddpmseg.classifier.run import member_path, read_member


def epoch_records(run):
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in lines if "epoch" in r]


def test_the_separate_trunk_learns_its_etf_task(store_path, small_config, tmp_path):
    # "separate" leaves the classifier as "none" trains it (test_etf_modes); what it adds is
    # its own trunk, trained on the ETF loss by its own optimiser: that loss must fall
    # (0.11 -> 0.017 over 4 epochs on this store; a trunk never stepped stays near 0.11).
    run = fit(store_path, tmp_path / "run", small_config(ensemble=1, etf="separate"),
              device="cpu", progress=False)
    etf = [r["etf_loss"] for r in epoch_records(run)]
    assert len(etf) == 4 and etf[-1] < etf[0] / 3


def test_the_separate_trunk_uses_the_configured_learning_rate(store_path, small_config,
                                                              tmp_path):
    # At lr 1e-7 the trunk barely moves: its ETF loss stays where it starts (at Adam's default
    # 1e-3 it would fall by half within the second epoch).
    cfg = small_config(ensemble=1, etf="separate", lr=1e-7, max_epochs=2)
    etf = [r["etf_loss"] for r in epoch_records(fit(store_path, tmp_path / "run", cfg,
                                                    device="cpu", progress=False))]
    assert len(etf) == 2 and abs(etf[1] - etf[0]) < 0.1 * etf[0]


def test_the_logged_etf_loss_is_the_epochs_mean_and_only_with_an_etf(store_path, small_config,
                                                                      tmp_path):
    # Several steps per epoch: loss = ce + w etf step by step, so the epoch means obey it too.
    w = 0.7
    run = fit(store_path, tmp_path / "shared", small_config(ensemble=1, max_epochs=1,
                                                            etf="shared", etf_weight=w),
              device="cpu", progress=False)
    (rec,) = epoch_records(run)
    assert rec["steps"] > 2
    # The member file records how it was trained.
    meta = read_member(member_path(run, 0))["meta"]
    assert (meta["etf"], meta["etf_weight"], meta["num_classes"], meta["widths"]) == \
        ("shared", w, 3, [128, 32])
    assert abs(rec["etf_loss"] - (rec["loss"] - rec["ce"]) / w) < 1e-4 * rec["etf_loss"]
    (rec,) = epoch_records(fit(store_path, tmp_path / "none",
                               small_config(ensemble=1, max_epochs=1, etf="none"),
                               device="cpu", progress=False))
    assert "etf_loss" not in rec and abs(rec["loss"] - rec["ce"]) < 1e-6 * rec["ce"]

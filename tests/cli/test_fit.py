"""``ddpmseg fit`` through click's CliRunner on a tiny synthetic store."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg.cli.main import cli
from ddpmseg.featcache.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo


@pytest.fixture
def tiny_store(tmp_path):
    rng = np.random.default_rng(0)
    spec = FeatureSpec(steps=(5,), blocks=(1, 2), shapes=((3, 4, 4), (2, 8, 8)),
                       image_size=(8, 8))
    info = StoreInfo(spec, num_images=2, names=("a", "b"), num_classes=2,
                     ignore_label=255, class_names=("bg", "fg"))
    store = FeatureStore.create(tmp_path / "tiny.zarr", info)
    for i in range(2):
        lab = (rng.random((8, 8)) < 0.5).astype(np.uint8)
        fine = np.stack([lab * 2.0, rng.normal(size=(8, 8))]).astype(np.float32)
        store.write_image(i, [rng.normal(size=(3, 4, 4)).astype(np.float32), fine], lab)
    return tmp_path / "tiny.zarr"


def test_fit_command(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--ensemble", "2",
                                   "--max-epochs", "2", "--batch-size", "16", "--etf", "none",
                                   "--seed", "3", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert {"config.json", "store.json", "member_00.pt", "member_01.pt",
            "train_log.jsonl"} <= {p.name for p in run.iterdir()}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["classifier"]["ensemble"] == 2 and cfg["classifier"]["etf"] == "none"
    assert cfg["classifier"]["seed"] == 3 and cfg["classifier"]["max_epochs"] == 2
    assert cfg["data"]["class_names"] == ["bg", "fg"]  # from the store, not the config
    assert "2 members" in res.output


def test_fit_rejects_a_bad_option(tiny_store, tmp_path):
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(tmp_path / "run"), "--etf", "foo"])
    assert res.exit_code == 2
    assert "--etf" in res.output and "foo" in res.output and "shared" in res.output
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(tmp_path / "run"),
                                   "--ensemble", "0"])
    assert res.exit_code == 2 and "--ensemble" in res.output


def test_fit_refuses_another_store_in_one_line(tiny_store, tmp_path):
    run = tmp_path / "run"
    args = ["--ensemble", "1", "--max-epochs", "1", "--device", "cpu", "--no-progress"]
    assert CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), *args]).exit_code == 0
    info = FeatureStore.open(tiny_store).info
    other = FeatureStore.create(tmp_path / "other.zarr", dataclasses.replace(
        info, spec=dataclasses.replace(info.spec, steps=(7,))))
    rng = np.random.default_rng(1)
    for i in range(2):
        other.write_image(i, [rng.normal(size=s).astype(np.float32) for s in info.shapes],
                          np.zeros((8, 8), np.uint8))
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "other.zarr"), str(run), *args])
    assert res.exit_code == 1
    assert "error:" in res.output and "another store" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "other.zarr"), str(run), *args,
                                   "--overwrite"])
    assert res.exit_code == 0, res.output


def test_fit_help_has_an_example():
    res = CliRunner().invoke(cli, ["fit", "--help"])
    assert res.exit_code == 0 and "ddpmseg fit stores/" in res.output


def test_fit_threads_are_set_and_recorded(tiny_store, tmp_path):
    import torch

    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--ensemble", "1",
                                       "--max-epochs", "1", "--batch-size", "16", "--threads", "2",
                                       "--device", "cpu", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    meta = torch.load(run / "member_00.pt", weights_only=True)["meta"]
    assert meta["threads"] == 2
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(r["threads"] == 2 for r in log if "epoch" in r and "done" not in r)
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output

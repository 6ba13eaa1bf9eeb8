"""``ddpmseg fit`` through click's CliRunner on a tiny synthetic store."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg.cli.main import cli
from ddpmseg.config import ClassifierConfig, Config, DataConfig
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo


def make_tiny_store(path, config: dict | None = None):
    """Two 8x8 images of two classes; ``config``: the config attribute extract would record."""
    rng = np.random.default_rng(0)
    spec = FeatureSpec(steps=(5,), blocks=(1, 2), shapes=((3, 4, 4), (2, 8, 8)),
                       image_size=(8, 8))
    info = StoreInfo(spec, num_images=2, names=("a", "b"), num_classes=2,
                     ignore_label=255, class_names=("bg", "fg"))
    store = FeatureStore.create(path, info, config=config)
    for i in range(2):
        lab = (rng.random((8, 8)) < 0.5).astype(np.uint8)
        fine = np.stack([lab * 2.0, rng.normal(size=(8, 8))]).astype(np.float32)
        store.write_image(i, [rng.normal(size=(3, 4, 4)).astype(np.float32), fine], lab)
    return path


@pytest.fixture
def tiny_store(tmp_path):
    return make_tiny_store(tmp_path / "tiny.zarr")


TINY_CONFIG = Config(data=DataConfig(name="tiny_2", num_classes=2, class_names=("bg", "fg")),
                     classifier=ClassifierConfig(etf="none", ensemble=3, max_epochs=1,
                                                 pixels_per_batch=16))


def test_fit_command(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--ensemble", "2",
                                   "--max-epochs", "2", "--pixels-per-batch", "16", "--etf", "none",
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


def test_fit_threads_are_used_and_recorded(tiny_store, tmp_path):
    """--threads is the fit's thread count, recorded; the process's is left as it was."""
    import torch

    before = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        torch.set_num_threads(1)
        res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--ensemble", "1",
                                       "--max-epochs", "1", "--pixels-per-batch", "16",
                                       "--threads", "2", "--device", "cpu", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    meta = torch.load(run / "member_00.pt", weights_only=True)["meta"]
    assert meta["threads"] == 2
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(r["threads"] == 2 for r in log if "epoch" in r and "done" not in r)
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


# -- which config fit uses --------------------------------------------------------------------
def test_fit_uses_the_config_the_store_was_extracted_with(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", TINY_CONFIG.to_dict())
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(store), str(run), "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fit: config tiny_2 (from the store)" in res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == "tiny_2"
    assert cfg["classifier"]["etf"] == "none" and cfg["classifier"]["ensemble"] == 3
    assert sorted(p.name for p in run.glob("member_*.pt")) == [
        "member_00.pt", "member_01.pt", "member_02.pt"]
    # An option overrides its key of the store's config, and only that key.
    res = CliRunner().invoke(cli, ["fit", str(store), str(tmp_path / "one"), "--ensemble", "1",
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["classifier"]["ensemble"] == 1 and cfg["classifier"]["etf"] == "none"
    assert cfg["data"]["name"] == "tiny_2"


def test_fit_config_option_wins_over_the_store_and_says_so(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", TINY_CONFIG.to_dict())
    toml = tmp_path / "mine.toml"
    toml.write_text('[data]\nname = "mine"\nnum_classes = 2\n'
                    '[classifier]\nensemble = 1\nmax_epochs = 1\npixels_per_batch = 16\n')
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(store), str(run), "--config", str(toml),
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"fit: config mine (from --config {toml})" in res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == "mine" and cfg["classifier"]["etf"] == "shared"
    assert cfg["data"]["class_names"] == ["bg", "fg"]


def test_fit_on_a_store_without_a_recorded_config_says_it_uses_the_defaults(tiny_store,
                                                                           tmp_path):
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(tmp_path / "run"),
                                   "--ensemble", "1", "--max-epochs", "1", "--pixels-per-batch", "16",
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fit: config custom (defaults: the store records no config)" in res.stderr


def test_fit_refuses_a_config_of_other_classes_before_writing(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--config", "cat_15",
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2, res.output  # a ConfigError
    lines = [x for x in res.output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1, res.output
    assert "cat_15" in errors[0] and "15 classes" in errors[0]
    assert str(tiny_store) in errors[0] and "2 classes" in errors[0]
    assert not run.exists()


def test_fit_refuses_an_infinite_etf_weight_before_writing(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--etf-weight", "inf",
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "--etf-weight" in res.output and "finite" in res.output
    assert not run.exists()
    toml = tmp_path / "inf.toml"
    toml.write_text("[classifier]\netf_weight = inf\n")
    res = CliRunner().invoke(cli, ["fit", str(tiny_store), str(run), "--config", str(toml)])
    assert res.exit_code == 2, res.output
    assert str(toml) in res.output and "[classifier].etf_weight must be finite" in res.output
    assert not run.exists()

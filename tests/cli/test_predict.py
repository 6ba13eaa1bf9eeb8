"""`ddpmseg predict` through click, with a small ensemble standing in for a trained run."""

import importlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ddpmseg.cli.main import cli
from ddpmseg.config import Config
from ddpmseg.classifier import Ensemble
from ddpmseg.featcache.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo

predict_module = importlib.import_module("ddpmseg.predict")


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ((4, 4, 5), (3, 8, 10))
SPEC = FeatureSpec(steps=(10,), blocks=(1, 2), shapes=SHAPES, image_size=(8, 10),
                   dtype="float16", backbone={"sha256": "s", "flags": {}})
INFO = StoreInfo(SPEC, num_images=2, names=("u", "v"), num_classes=3, ignore_label=255,
                 has_labels=False)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    s = FeatureStore.create(path, INFO)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        s.write_image(i, [torch.randn(*shape, generator=g) for shape in SHAPES])
    return path


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run directory whose loading yields two linear members (the classifier may be absent)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    members = [nn.Linear(7, 3).eval() for _ in range(2)]
    loaded = Ensemble(members, INFO, Config(), run_dir)
    monkeypatch.setattr(predict_module, "load_run", lambda run, device: loaded)
    return run_dir


def test_predict_cli_writes_outputs(tmp_path, store, fake_run):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out), "--vote",
                                   "hard", "--tile-rows", "3", "--uncertainty", "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "predicted 2 images" in res.output
    settings = json.loads((out / "predict.json").read_text())
    assert settings["vote"] == "hard" and settings["tile_rows"] == 3 and settings["uncertainty"]
    for name in ("u", "v"):
        assert np.load(out / f"{name}.npy").shape == (8, 10)
        assert (out / f"{name}_overlay.png").is_file() and (out / f"{name}_jsd.npy").is_file()
    assert (out / "summary.png").is_file() and (out / "palette.json").is_file()


def test_predict_cli_missing_input_is_an_error_line(tmp_path, fake_run):
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(tmp_path / "missing"),
                                   str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code != 0
    assert "error:" in res.output and "missing" in res.output


def test_predict_cli_missing_run_is_an_error_line(tmp_path, store):
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "norun"), str(store),
                                   str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code != 0
    assert "error:" in res.output and "norun" in res.output


def test_predict_cli_bad_option_values(tmp_path, store, fake_run):
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(tmp_path / "o"),
                                   "--vote", "median"])
    assert res.exit_code == 2
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(tmp_path / "o"),
                                   "--tile-rows", "0"])
    assert res.exit_code == 2


def test_predict_cli_report_prints_the_index_path(tmp_path, store, fake_run):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                      "--uncertainty", "--report", "--no-progress"])
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    assert result.stdout.strip().splitlines()[-1] == str(index)
    page = index.read_text()
    assert page.count('class="card"') == 2 and "mean JSD" in page
    settings = json.loads((out / "predict.json").read_text())
    assert settings["config"]["classifier"]["etf"] == Config().classifier.etf

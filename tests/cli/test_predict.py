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


def test_two_predicts_into_one_out_the_second_fails_at_once(tmp_path, store, fake_run,
                                                            monkeypatch):
    """A second predict into an OUT that a predict is writing fails with one error line naming
    the holder's pid, writing nothing; the first one's outputs are complete and as a predict
    alone writes them. The lock file is no file of OUT: evaluate, report and a rerun of predict
    see only the prediction."""
    import os

    from ddpmseg.evaluate import evaluate
    from ddpmseg.report import report

    alone = predict_module.predict(fake_run, store, tmp_path / "alone", uncertainty=True,
                                   device="cpu", progress=False)
    out = tmp_path / "out"
    second = []
    real = predict_module._write_image_outputs

    def write_then_start_a_second_predict(*args, **kwargs):
        written = real(*args, **kwargs)
        if not second:  # the first predict is half-way: one image written, one to go
            second.append(CliRunner().invoke(cli, ["predict", str(fake_run), str(store),
                                                   str(out), "--device", "cpu",
                                                   "--no-progress"]))
        return written

    monkeypatch.setattr(predict_module, "_write_image_outputs",
                        write_then_start_a_second_predict)
    first = predict_module.predict(fake_run, store, out, uncertainty=True, device="cpu",
                                   progress=False)
    (refused,) = second
    assert refused.exit_code == 1
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: prediction folder {out} is being written by process {os.getpid()} ")
    assert first["names"] == ["u", "v"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                           (tmp_path / "alone").iterdir())
    for name in ("u", "v"):
        for kind in ("npy", "entropy", "jsd"):
            assert np.array_equal(np.load(first["outputs"][name][kind]),
                                  np.load(alone["outputs"][name][kind]))
    # The lock is OUT's hidden sibling; nothing reads it as a prediction or a foreign file.
    assert (tmp_path / ".out.lock").is_file() and not list(out.glob("*.lock"))
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("u", "v"):
        np.save(gt / f"{name}.npy", np.load(out / f"{name}.npy"))
    result = evaluate(out, gt)
    assert result["names"] == ["u", "v"] and result["miou"] == pytest.approx(1.0)
    assert report(out).read_text().count('class="card"') == 2
    monkeypatch.setattr(predict_module, "_write_image_outputs", real)
    again = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                     "--device", "cpu", "--no-progress"])
    assert again.exit_code == 0, again.output

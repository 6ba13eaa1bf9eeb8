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
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo

predict_module = importlib.import_module("ddpmseg.pipelines.predict")


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

    from ddpmseg.outputs.evaluate import evaluate
    from ddpmseg.outputs.report import report

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


# -- OUT is swapped in whole: an interrupted predict leaves the earlier prediction ----------

def _tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _beside(tmp_path):
    """What predict left beside OUT other than its lock file."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")
                  and p.name != ".out.lock")


def _earlier(tmp_path, store, fake_run):
    out = tmp_path / "out"
    predict_module.predict(fake_run, store, out, device="cpu", progress=False)
    (out / "mine.txt").write_text("a user's file")  # not predict's: carried over
    return out, _tree(out)


def _same_prediction(out, alone):
    """OUT holds what a predict alone into a new folder writes (label maps byte for byte)."""
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in alone.iterdir()] + ["mine.txt"])
    for npy in alone.glob("*.npy"):
        assert (out / npy.name).read_bytes() == npy.read_bytes()
    assert (out / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize("fault", ["enospc", "ctrl_c"])
def test_a_failed_predict_leaves_the_earlier_prediction_byte_for_byte(tmp_path, store,
                                                                       fake_run, monkeypatch,
                                                                       fault):
    import errno

    out, before = _earlier(tmp_path, store, fake_run)
    real = predict_module._write_image_outputs
    calls = []

    def fail_on_the_second_image(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            if fault == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "v.png"))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(predict_module, "_write_image_outputs", fail_on_the_second_image)
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                   "--uncertainty", "--device", "cpu", "--no-progress"])
    assert calls[0] != out  # written elsewhere, not into OUT
    assert _tree(out) == before and _beside(tmp_path) == []
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "resume" not in lines[0], res.output
    if fault == "enospc":
        assert res.exit_code == 1
        assert lines[0].startswith(f"error: no space left on the device writing the "
                                   f"prediction {out}: ")
        assert " free" in lines[0] and "earlier prediction in it is unchanged" in lines[0]
    else:
        assert res.exit_code == 130
        assert lines[0] == (f"error: interrupted; the prediction folder is as it was; rerun "
                            f"the same command to predict again")
    monkeypatch.setattr(predict_module, "_write_image_outputs", real)
    assert CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                    "--uncertainty", "--no-progress"]).exit_code == 0
    alone = tmp_path / "alone"
    predict_module.predict(fake_run, store, alone, uncertainty=True, device="cpu",
                           progress=False)
    _same_prediction(out, alone)
    assert _beside(tmp_path) == []


_KILLED = """
import importlib, os, signal, sys
from pathlib import Path
import torch
from torch import nn
sys.path.insert(0, {tests!r})
import test_predict as T
from ddpmseg.classifier import Ensemble
from ddpmseg.config import Config
P = importlib.import_module("ddpmseg.pipelines.predict")
module, name, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
real, calls = getattr(owner, name), []

def killer(*args, **kwargs):
    calls.append(1)
    if len(calls) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(owner, name, killer)
torch.manual_seed(0)
members = [nn.Linear(7, 3).eval() for _ in range(2)]
P.load_run = lambda run, device: Ensemble(members, T.INFO, Config(), Path(sys.argv[4]))
P.predict(sys.argv[4], sys.argv[5], sys.argv[6], uncertainty=True, device="cpu",
          progress=False)
"""


# (module, function, call at which predict is killed): while writing the images; once the
# new prediction is whole (before it is named .out.new, before mine.txt is carried into it,
# between the renames OUT -> .out.old and .out.new -> OUT); before the old one is deleted.
KILL_POINTS = [("ddpmseg.pipelines.predict", "_write_image_outputs", 2),
               ("ddpmseg.outputs.folder", "_move", 1), ("ddpmseg.outputs.folder", "_move", 2),
               ("ddpmseg.outputs.folder", "_move", 4),
               ("ddpmseg.outputs.folder", "_remove_tree", 1)]


@pytest.mark.parametrize("module, function, at", KILL_POINTS)
@pytest.mark.slow
def test_a_killed_predict_leaves_the_earlier_prediction_or_the_new_one(
        tmp_path, store, fake_run, module, function, at):
    """SIGKILL at each step: the earlier prediction stays whole until the new one is, and the
    next predict finishes (or cleans up) what the killed one left."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out, before = _earlier(tmp_path, store, fake_run)
    alone = tmp_path / "alone"
    predict_module.predict(fake_run, store, alone, uncertainty=True, device="cpu",
                           progress=False)
    script = _KILLED.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, module, function, str(at),
                           str(fake_run), str(store), str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if function == "_remove_tree":  # the new prediction was swapped in
        _same_prediction(out, alone)
    elif (module, at) == ("ddpmseg.outputs.folder", 4):  # between the two renames
        assert not out.exists()
        assert _tree(tmp_path / ".out.old") == {k: v for k, v in before.items()
                                                if k != "mine.txt"}
    else:
        assert {k: v for k, v in _tree(out).items() if k != "mine.txt"} == \
            {k: v for k, v in before.items() if k != "mine.txt"}
    # The next predict completes what the killed one left, then writes its own.
    assert CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                    "--uncertainty", "--no-progress"]).exit_code == 0
    _same_prediction(out, alone)
    assert _beside(tmp_path) == []


# -- evaluate and report refuse a folder that no predict finished ----------------------------

@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_evaluate_and_report_refuse_an_unfinished_prediction_folder(tmp_path, store,
                                                                     fake_run, command):
    out = tmp_path / "out"
    predict_module.predict(fake_run, store, out, device="cpu", progress=False)
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("u", "v"):
        np.save(gt / f"{name}.npy", np.load(out / f"{name}.npy"))
    args = [command, str(out), str(gt)] if command == "evaluate" else [command, str(out)]
    (out / "v.npy").unlink()  # predict.json lists v
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: prediction folder {out} is incomplete: 1 of the 2 images predict.json lists "
        f"has no label map (v.npy); rerun `ddpmseg predict` to write it again"]
    (out / "predict.json").unlink()  # as a killed predict left it, before this branch
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: prediction folder {out} has no predict.json: no `ddpmseg predict` finished "
        f"writing it; rerun `ddpmseg predict` to write it again"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["palette.json", "summary.png", "u.npy", "u.png", "u_overlay.png", "v.png",
         "v_overlay.png"])  # nothing written: no metrics.json, no report


def test_predict_on_a_full_disk_names_out_and_the_free_space(tmp_path, store, fake_run,
                                                             tiny_disk):
    """A real full disk (a tmpfs that holds the earlier prediction but not a second, larger
    one beside it): one line naming OUT and the free space; OUT is as it was."""
    import shutil

    from ddpmseg.core.fileio import size_text

    measure = tmp_path / "measure"
    predict_module.predict(fake_run, store, measure, device="cpu", progress=False)
    pages = sum(-(-p.stat().st_size // 4096) for p in measure.iterdir())
    disk = tiny_disk(4 * pages + 8)  # the earlier prediction and 2 more pages
    out = disk / "out"
    predict_module.predict(fake_run, store, out, device="cpu", progress=False)
    before = _tree(out)
    res = CliRunner().invoke(cli, ["predict", str(fake_run), str(store), str(out),
                                   "--uncertainty", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    (line,) = res.output.strip().splitlines()
    assert line.startswith(f"error: no space left on the device writing the prediction {out}: "
                           f"{size_text(shutil.disk_usage(disk).free)} free; free some space")
    assert "earlier prediction in it is unchanged" in line
    assert _tree(out) == before and sorted(p.name for p in disk.iterdir()) == [".out.lock",
                                                                               "out"]

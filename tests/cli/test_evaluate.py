"""`ddpmseg evaluate` through click: the table, metrics.json, config classes, error lines."""

import json

import numpy as np
from click.testing import CliRunner

from ddpmseg.cli.main import cli


def write_case(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    # class 0: inter 1, union 2 -> 0.5; class 1: inter 1, union 2 -> 0.5; class 2: inter 1 -> 1.0
    np.save(pred / "x.npy", np.array([[0, 1], [1, 2]], np.uint8))
    np.save(gt / "x.npy", np.array([[0, 0], [1, 2]], np.uint8))
    (pred / "predict.json").write_text('{"names": ["x"]}')  # as a finished predict's lists it
    return pred, gt


def test_evaluate_prints_table_and_writes_metrics(tmp_path):
    pred, gt = write_case(tmp_path)
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "3",
                                   "--ignore-label", "255", "--confusion"])
    assert res.exit_code == 0, res.output
    assert "IoU %" in res.output and "class_1" in res.output
    assert "mIoU 66.67 %" in res.output
    metrics = json.loads((pred / "metrics.json").read_text())
    assert abs(metrics["miou"] - 2 / 3) < 1e-9
    assert (pred / "confusion.csv").is_file() and (pred / "confusion.png").is_file()


def test_evaluate_takes_classes_from_config(tmp_path):
    pred, gt = write_case(tmp_path)
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--config", "cat_15",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "background" in res.output  # cat_15's class names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 15 and len(metrics["classes"]) == 15
    assert abs(metrics["miou"] - 2 / 15) < 1e-9  # 0.5 + 0.5 + 1.0 over 15 classes


def test_evaluate_missing_paths_give_error_lines(tmp_path):
    pred, gt = write_case(tmp_path)
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "nope"), str(gt),
                                   "--num-classes", "3"])
    assert res.exit_code != 0
    assert "error:" in res.output and "nope" in res.output
    (gt / "x.npy").unlink()
    res = CliRunner().invoke(cli, ["evaluate", str(pred), str(gt), "--num-classes", "3"])
    assert res.exit_code != 0
    assert "error:" in res.output and "x.npy" in res.output

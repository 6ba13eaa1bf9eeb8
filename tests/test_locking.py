"""Readers and writers of a prediction folder take its lock: evaluate and report fail at once
while another process writes the folder they would read or write (suggest: in
tests/classifier/test_labelloop.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg import locking
from ddpmseg.cli.main import cli
from ddpmseg.evaluate import evaluate
from ddpmseg.locking import LockedError, writer_lock


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    labels = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    np.save(pred / "a.npy", labels)
    np.save(gt / "a.npy", labels)
    return pred, gt


def test_evaluate_and_report_wait_for_no_predict(folders, hold_lock):
    pred, gt = folders
    pid = hold_lock(pred)
    for args in (["evaluate", str(pred), str(gt), "--num-classes", "3"], ["report", str(pred)]):
        result = CliRunner().invoke(cli, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: prediction folder {pred} is being written by "
                                   f"process {pid} ")
    with pytest.raises(LockedError):
        evaluate(pred, gt, num_classes=3, write=False)
    assert sorted(p.name for p in pred.iterdir()) == ["a.npy"]  # nothing written
    hold_lock.release()
    result = evaluate(pred, gt, num_classes=3)
    assert result["miou"] == pytest.approx(1.0) and (pred / "metrics.json").is_file()


def test_evaluate_locks_its_out_folder_too(folders, tmp_path, hold_lock):
    pred, gt = folders
    out = tmp_path / "metrics"
    hold_lock(out, "metrics folder")
    with pytest.raises(LockedError, match="metrics folder"):
        evaluate(pred, gt, num_classes=3, out=out)
    # reading alone does not need the out folder
    assert evaluate(pred, gt, num_classes=3, out=out, write=False)["miou"] == 1.0
    assert not out.exists() or not any(out.iterdir())


def test_a_reader_goes_on_unlocked_where_no_lock_can_be_made(folders, monkeypatch):
    pred, gt = folders
    monkeypatch.setattr(locking, "lock_path", lambda target: Path("/proc/no-such/x.lock"))
    assert evaluate(pred, gt, num_classes=3, write=False)["miou"] == 1.0
    with pytest.raises(locking.OutputError, match="cannot create /proc/no-such/x.lock"):
        with writer_lock(pred, "prediction folder"):
            pass

"""The scripts in examples/ run as written, on a few of the demo's images."""

import runpy
import shutil
from pathlib import Path

import pytest

from ddpmseg.backbone.bundled import DEMO_DATA

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def copy_pairs(src: Path, dst: Path, n: int) -> None:
    dst.mkdir(parents=True)
    for npy in sorted(src.glob("*.npy"))[:n]:
        shutil.copy(npy, dst)
        shutil.copy(npy.with_suffix(".png"), dst)


@pytest.mark.slow
def test_own_data_example(tmp_path, monkeypatch, capsys, one_thread):
    """extract, fit, predict, evaluate and report on a folder of one's own images (here three
    demo faces to train on, two to test), with the bundled backbone."""
    copy_pairs(DEMO_DATA / "train", tmp_path / "my_data" / "train", 3)
    copy_pairs(DEMO_DATA / "test", tmp_path / "my_data" / "test", 2)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / "own_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "mIoU " in out and "over 34 classes" in out, out
    work = tmp_path / "ddpmseg_work"
    assert (work / "preds" / "report" / "index.html").is_file()
    names = sorted(p.stem for p in (tmp_path / "my_data" / "test").glob("*.png"))
    assert all((work / "preds" / f"{name}.npy").is_file() for name in names)
    assert all((work / "preds" / f"{name}_uncertainty.png").is_file() for name in names)

"""`ddpmseg demo` from start to finish with its defaults, as the README's quickstart runs it:
extract, fit, predict, evaluate and report on the bundled faces, nothing stubbed out. About 45 s
of CPU time on one thread (measured: 42 s user for the command; its wall time grows with the
machine's load)."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpmseg.backbone.bundled import DEMO_DATA
from ddpmseg.cli.main import cli
from ddpmseg.outputs.evaluate import evaluate


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, one_thread):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["--no-progress", "demo", "--out", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    names = sorted(p.stem for p in (DEMO_DATA / "test").glob("*.png"))
    # stdout: the per-class table, its mIoU line, then the report's path.
    lines = res.stdout.strip().splitlines()
    index = out / "pred" / "report" / "index.html"
    assert lines[-1] == str(index)
    miou = re.fullmatch(r"mIoU (\d+\.\d\d) % over 34 classes, (\d+) images .*", lines[-2])
    assert miou and int(miou[2]) == len(names), lines[-2]
    # The printed figure is the predictions' score, recomputed here from the written masks.
    again = evaluate(out / "pred", DEMO_DATA / "test", num_classes=34, write=False)
    assert miou[1] == f"{100 * again['miou']:.2f}"
    assert 0.15 < again["miou"] < 1  # trained: far above chance over 34 classes
    for name in names:
        mask = np.load(out / "pred" / f"{name}.npy")
        assert mask.shape == (64, 64) and mask.max() < 34
        assert (out / "pred" / f"{name}_overlay.png").is_file()
    with Image.open(out / "pred" / "summary.png") as summary:
        assert summary.size[0] > 64 and summary.size[1] > 64
    page = index.read_text()
    assert f"mIoU {miou[1]} %" in page
    assert all(name in page for name in names)

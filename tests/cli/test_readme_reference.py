"""README's "Coming from ddpm-segmentation": every command runs as written, on the fixture."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddpmseg.classifier import load_ensemble
from ddpmseg.cli.main import cli

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Coming from ddpm-segmentation"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_section_has_config_import_predict_and_export():
    names = [shlex.split(c)[1] for c in readme_commands()]
    assert names == ["extract", "import-run", "predict", "evaluate", "export-run", "import-run"]


@pytest.mark.slow
def test_readme_commands_run_as_written(shared_dir, missing_shared, tmp_path, monkeypatch,
                                        one_thread):
    ref = shared_dir / "fixtures" / "reference_run"
    if not ref.is_dir():
        missing_shared(f"{ref} is absent")
    # The README runs from the repository root, beside ../shared.
    (tmp_path / "shared").symlink_to(shared_dir)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    outputs = {}
    for command in readme_commands():
        argv = shlex.split(command)
        assert argv[0] == "ddpmseg"
        result = CliRunner().invoke(cli, argv[1:])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        outputs[argv[1]] = result.output
    same = total = 0
    for expected in sorted((ref / "expected").glob("*.npy")):
        got = np.load(tmp_path / "repo" / "preds" / "ref" / expected.name)
        same += int((got == np.load(expected)).sum())
        total += got.size
    assert same / total >= 0.999
    assert re.search(r"mIoU\D*25\.4", outputs["evaluate"]), outputs["evaluate"]
    assert "ETF" not in outputs["export-run"]  # an imported run has no ETF head to drop
    assert (tmp_path / "repo" / "exported" / "ref" / "pixel_classifiers" / "50_150_250_2_4_5_7_8"
            / "model_2.pth").is_file()
    # ... and imported back from that folder, member for member.
    back, ref_run = (load_ensemble(tmp_path / "repo" / "runs" / r, "cpu") for r in ("back", "ref"))
    for a, b in zip(back.members, ref_run.members, strict=True):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())

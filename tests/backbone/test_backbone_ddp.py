"""DDP training under torchrun (2 CPU processes, gloo): checkpoints load, and a step on two
ranks of half a batch each matches a single-process step on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ddpmseg.backbone import Backbone, ModelFlags
from ddpmseg.backbone.train import Trainer, train_backbone
from ddpmseg.core.errors import ConfigError
from tests.local_server import free_port

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.distributed,
]

# The tiny model of test_backbone_train, without dropout so that the ranks' dropout streams
# cannot make the DDP run differ from the single-process one.
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_heads=2, dropout=0.0, learn_sigma=True,
            diffusion_steps=100)
STEPS, BATCH, LR = 3, 4, 1e-3
CLI_ARGS = ["--iterations", str(STEPS), "--images-per-iteration", str(BATCH), "--lr", str(LR), "--ema", "0.5",
            "--device", "cpu", "--samples", "2", "--sample-passes", "2", "--no-progress"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _torchrun(tmp_path, args, nproc=2):
    """``torchrun --nproc_per_node N <script> train-backbone ...``; the script is what the
    ``ddpmseg`` console entry runs (torchrun takes a script path)."""
    script = tmp_path / "ddpmseg_entry.py"
    script.write_text("import sys\nfrom ddpmseg.cli.main import main\n"
                      "sys.argv[0] = 'ddpmseg'\nmain()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), "train-backbone", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_ddp_run_matches_single_process(images_dir, tmp_path):
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps(TINY))
    ddp = tmp_path / "ddp"
    res = _torchrun(tmp_path, [images_dir, ddp, "--preset", flags_file, *CLI_ARGS])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ema.pt, model.pt") == 1  # only rank 0 reports
    for name in ("ema.pt", "model.pt", "state.pt", "flags.json", "train_log.jsonl",
                 "samples.png"):
        assert (ddp / name).is_file(), name
    assert not [p for p in ddp.iterdir() if p.name.startswith(".")]
    bb = Backbone.from_checkpoint(ddp / "ema.pt", ddp / "flags.json")  # strict load
    assert bb.flags == ModelFlags.resolve(TINY)
    lines = [json.loads(x) for x in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [STEPS]  # one writer: each log line once
    state = torch.load(ddp / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rank_rng"]) == 2

    # The same run in one process with the whole batch: the ranks' gradients are averaged,
    # so the weights agree up to float rounding (summation order differs, and Adam's
    # normalisation enlarges it on near-zero gradients: ~3e-3 here; unrelated runs: ~1).
    single = train_backbone(images_dir, tmp_path / "single", TINY, steps=STEPS,
                            batch_size=BATCH, lr=LR, ema=0.5, device="cpu", samples=0,
                            progress=False)
    torch.manual_seed(0)
    from ddpmseg.backbone import UNetModel
    init = UNetModel.from_flags(ModelFlags.resolve(TINY)).state_dict()
    a, b = _weights(ddp / "model.pt"), _weights(single / "model.pt")
    assert a.keys() == b.keys()
    da = torch.cat([(a[k] - init[k]).flatten() for k in a if a[k].is_floating_point()])
    db = torch.cat([(b[k] - init[k]).flatten() for k in b if b[k].is_floating_point()])
    assert float(db.norm()) > 0
    rel = float((da - db).norm() / db.norm())
    assert rel < 2e-2, rel
    s_state = torch.load(single / "state.pt", map_location="cpu", weights_only=True)
    # Same data order and draws from the run's generator as the single-process run.
    assert torch.equal(state["generator"], s_state["generator"])
    assert torch.equal(state["order"]["perm"], s_state["order"]["perm"])
    s_loss = json.loads((single / "train_log.jsonl").read_text().splitlines()[-1])["loss"]
    assert lines[-1]["loss"] == pytest.approx(s_loss, rel=1e-3)


def test_ddp_resume_and_uneven_batch(images_dir, tmp_path):
    out = tmp_path / "run"
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps({**TINY, "dropout": 0.1}))  # per-rank dropout streams
    res = _torchrun(tmp_path, [images_dir, out, "--preset", flags_file, "--iterations", "2",
                               "--images-per-iteration", "2", "--device", "cpu", "--samples", "0",
                               "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    # Resumed on two ranks: every rank loads the state; the run goes on to step 4.
    res = _torchrun(tmp_path, [images_dir, out, "--resume", "--iterations", "4", "--images-per-iteration", "2",
                               "--device", "cpu", "--samples", "0", "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4
    Backbone.from_checkpoint(out / "ema.pt", out / "flags.json")
    # A global batch that does not split over the ranks is refused before any collective.
    with pytest.raises(ConfigError, match="multiple of 2"):
        Trainer(torch.zeros(5, 3, 16, 16, dtype=torch.uint8), ModelFlags.resolve(TINY), None,
                batch_size=3, device="cpu", rank=0, world_size=2)

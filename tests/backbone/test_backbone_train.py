"""Training a backbone: the loss falls, checkpoints load strictly, resume is exact, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddpmseg.backbone import Backbone, ModelFlags
from ddpmseg.backbone.diffusion import Schedule
from ddpmseg.backbone.sampling import sample
from ddpmseg.backbone.train import (
    Trainer,
    center_crop,
    load_images,
    train_backbone,
    training_losses,
)
from ddpmseg.core.errors import BadInputError, ConfigError, InputNotFoundError, RunError

# 16 px, two levels of 32 and 64 channels, attention at 8 px, dropout on (so resume has to
# restore the global generator too) and learn_sigma (the hybrid loss).
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", num_heads=2, dropout=0.1, learn_sigma=True,
            diffusion_steps=100)

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_center_crop_and_load(images_dir):
    arr = np.zeros((30, 50, 3), dtype=np.uint8)
    arr[:, 20:30] = 255  # a bar in the middle survives the centre crop
    out = center_crop(arr, 16)
    assert out.shape == (16, 16, 3) and out[:, 8].min() > 200 and out[:, 0].max() < 50
    imgs = load_images(images_dir, 16)
    assert imgs.shape == (5, 3, 16, 16) and imgs.dtype == torch.uint8


def test_training_lowers_the_loss_on_a_fixed_batch(images_dir):
    flags = ModelFlags.resolve(TINY)
    tr = Trainer(load_images(images_dir, 16), flags, None, batch_size=5, lr=2e-3, ema=0.9,
                 device="cpu", seed=0)
    g = torch.Generator().manual_seed(123)
    x0 = tr.images.float() / 127.5 - 1
    t = torch.randint(0, flags.diffusion_steps, (5,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def fixed_loss():
        tr.model.eval()  # no dropout: the same batch gives the same loss
        with torch.no_grad():
            res = training_losses(tr.model, tr.schedule, x0, t, noise, True)
        tr.model.train()
        return {k: float(v.mean()) for k, v in res.items()}

    before = fixed_loss()
    for _ in range(15):
        tr.train_step()
    after = fixed_loss()
    assert np.isfinite(after["loss"]) and after["loss"] < before["loss"] * 0.9, (before, after)
    assert after["mse"] < before["mse"]
    assert tr.step == 15
    # The EMA moved away from the initial weights, towards (but not onto) the raw ones.
    p = dict(tr.model.named_parameters())["out.2.weight"]
    e = dict(tr.ema_model.named_parameters())["out.2.weight"]
    assert 0 < float(e.abs().sum()) and not torch.equal(e, p)


def test_fixed_variance_loss_and_sampling_shape():
    flags = ModelFlags.resolve({**TINY, "learn_sigma": False, "dropout": 0.0})
    from ddpmseg.backbone import UNetModel
    torch.manual_seed(0)
    model = UNetModel.from_flags(flags)
    schedule = Schedule.from_flags(flags)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    res = training_losses(model, schedule, x0, torch.tensor([0, 99]), torch.randn_like(x0), False)
    assert set(res) == {"mse", "loss"} and res["loss"].shape == (2,)
    g = torch.Generator().manual_seed(0)
    imgs = sample(model, flags, 3, steps=4, generator=g)
    assert imgs.shape == (3, 3, 16, 16) and imgs.abs().max() <= 1
    # Respacing keeps the first and last steps and the cumulative products of the kept ones.
    r = schedule.respaced(4)
    assert r.timestep_map.tolist() == [0, 33, 66, 99]


@pytest.mark.slow
def test_checkpoints_and_outputs(images_dir, tmp_path):
    out = train_backbone(images_dir, tmp_path / "run", TINY, steps=3, batch_size=2,
                         samples=2, sample_steps=3, log_every=1, progress=False)
    for name in ("ema.pt", "model.pt", "state.pt", "flags.json", "train_log.jsonl",
                 "samples.png"):
        assert (out / name).is_file(), name
    # ema.pt loads strictly, with the saved flags as with the given ones.
    bb = Backbone.from_checkpoint(out / "ema.pt", out / "flags.json")
    assert bb.flags == ModelFlags.resolve(TINY)
    ema = _weights(out / "ema.pt")
    assert all(torch.equal(ema[k], v) for k, v in bb.model.state_dict().items())
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) and x["images_per_s"] > 0 and "vb" in x for x in lines)
    with Image.open(out / "samples.png") as im:
        assert im.size == (32, 16)
    # No temp files left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(images_dir, tmp_path):
    # 5 images in batches of 2: the resumed part crosses an epoch boundary mid-batch.
    kw = dict(batch_size=2, lr=1e-3, ema=0.9, samples=0, progress=False, seed=3)
    full = train_backbone(images_dir, tmp_path / "full", TINY, steps=6, **kw)
    part = train_backbone(images_dir, tmp_path / "part", TINY, steps=2, **kw)
    assert torch.load(part / "state.pt", weights_only=False)["step"] == 2
    train_backbone(images_dir, part, None, steps=6, resume=True, **kw)
    for name in ("model.pt", "ema.pt"):
        a, b = _weights(full / name), _weights(part / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sa = torch.load(full / "state.pt", weights_only=False)
    sb = torch.load(part / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    assert torch.equal(sa["generator"], sb["generator"])
    assert torch.equal(sa["torch_rng"], sb["torch_rng"])
    # The log of the resumed run holds each step once.
    steps = [json.loads(x)["step"] for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 6]
    # A finished run resumed to the same step does nothing.
    train_backbone(images_dir, part, None, steps=6, resume=True, **kw)
    assert torch.load(part / "state.pt", weights_only=False)["step"] == 6


def test_existing_run_needs_resume_and_same_flags(images_dir, tmp_path):
    kw = dict(batch_size=2, samples=0, progress=False)
    out = train_backbone(images_dir, tmp_path / "run", TINY, steps=1, **kw)
    with pytest.raises(RunError, match="`resume=True`"):
        train_backbone(images_dir, out, TINY, steps=2, **kw)
    with pytest.raises(ConfigError, match="flags differ"):
        train_backbone(images_dir, out, {**TINY, "dropout": 0.0}, steps=2, resume=True, **kw)


def test_bad_input(images_dir, tmp_path):
    kw = dict(steps=1, batch_size=2, samples=0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputNotFoundError, match="no images"):
        train_backbone(empty, tmp_path / "o1", TINY, **kw)
    with pytest.raises(InputNotFoundError):
        train_backbone(tmp_path / "missing", tmp_path / "o2", TINY, **kw)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(BadInputError, match="a.png"):
        train_backbone(broken, tmp_path / "o3", TINY, **kw)
    with pytest.raises(ConfigError, match="GroupNorm"):
        train_backbone(images_dir, tmp_path / "o4", {**TINY, "num_channels": 20}, **kw)
    with pytest.raises(ConfigError, match="unknown model flag"):
        train_backbone(images_dir, tmp_path / "o5", {**TINY, "num_chanels": 32}, **kw)
    with pytest.raises(ConfigError, match="unknown model preset"):
        train_backbone(images_dir, tmp_path / "o6", "nope", **kw)
    with pytest.raises(ConfigError, match="iterations or of minutes"):
        train_backbone(images_dir, tmp_path / "o7", TINY, batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="images_per_iteration"):
        train_backbone(images_dir, tmp_path / "o8", TINY, steps=1, batch_size=0)
    assert not (tmp_path / "o4").exists()


def test_cli(images_dir, tmp_path):
    import click

    from ddpmseg.cli.main import Group
    from ddpmseg.cli.train_backbone import command

    @click.group(cls=Group)
    @click.option("--debug", is_flag=True)
    @click.option("-q", "--quiet", is_flag=True)
    def cli(debug, quiet):
        pass

    cli.add_command(command)
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    args = ["train-backbone", str(images_dir), str(out), "--preset", str(flags),
            "--images-per-iteration", "2", "--samples", "0", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(cli, args + ["--iterations", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "ema.pt").is_file()
    res = CliRunner().invoke(cli, ["train-backbone", str(images_dir), str(out), "--resume",
                                   "--iterations", "2", "--samples", "0", "--images-per-iteration", "2",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    res = CliRunner().invoke(cli, args + ["--iterations", "3"])
    assert res.exit_code == 1 and "error:" in res.output and "--resume" in res.output
    res = CliRunner().invoke(cli, ["train-backbone", str(images_dir), str(tmp_path / "x"),
                                   "--iterations", "1"])
    assert res.exit_code == 2 and "--preset" in res.output
    res = CliRunner().invoke(cli, ["train-backbone", "--help"])
    assert res.exit_code == 0 and "ddpmseg train-backbone" in res.output


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(images_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    kw = dict(batch_size=2, lr=1e-3, ema=0.9, samples=0, progress=False, seed=1)
    out = tmp_path / "killed"
    code = ("import torch, json, sys; torch.set_num_threads(1)\n"
            "from ddpmseg.backbone.train import train_backbone\n"
            f"train_backbone({str(images_dir)!r}, {str(out)!r}, json.loads(sys.argv[1]), "
            "steps=100000, save_every=1e-9, batch_size=2, lr=1e-3, ema=0.9, samples=0, "
            "progress=False, seed=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(TINY)])
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if (out / "state.pt").is_file():
                try:
                    if torch.load(out / "state.pt", weights_only=False)["step"] >= 3:
                        break
                except (RuntimeError, EOFError, OSError):
                    pass  # replaced while reading
            assert proc.poll() is None, "the training process died"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint past step 3 within 40 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # state.pt is the commit record: weight files of a later, unfinished save are dropped.
    killed_step = torch.load(out / "state.pt", weights_only=False)["step"]
    assert killed_step >= 3
    total = killed_step + 2
    train_backbone(images_dir, out, None, steps=total, resume=True, **kw)
    full = train_backbone(images_dir, tmp_path / "full", TINY, steps=total, **kw)
    for name in ("model.pt", "ema.pt"):
        a, b = _weights(full / name), _weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(out.glob(".*"))


def test_a_fresh_trainer_starts_from_guided_diffusions_zero_init(images_dir):
    """ResBlocks' last convs, attention proj_out and the output conv start at zero (as
    guided-diffusion's zero_module), so a fresh model predicts exactly zero."""
    tr = Trainer(load_images(images_dir, 16), ModelFlags.resolve(TINY), None, batch_size=5,
                 device="cpu", seed=0)
    names = [n for n, _ in tr.model.named_parameters()]
    zeroed = [n for n in names if n.startswith("out.2.") or ".out_layers.3." in n
              or ".proj_out." in n]
    # every ResBlock (2 in, 1 down, 2 middle, 3 out, 1 up ... ) and attention block is covered
    assert len([n for n in zeroed if n.endswith("out_layers.3.weight")]) >= 8
    assert any(".proj_out." in n for n in zeroed) and "out.2.weight" in zeroed
    params = dict(tr.model.named_parameters())
    for n in zeroed:
        assert torch.count_nonzero(params[n]) == 0, n
    # the rest is not zero, and the EMA copy starts equal
    assert torch.count_nonzero(params["input_blocks.0.0.weight"]) > 0
    assert torch.equal(dict(tr.ema_model.named_parameters())["out.2.weight"], params["out.2.weight"])
    tr.model.eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tr.model(x, torch.tensor([3, 70]))
    assert out.shape == (2, 6, 16, 16) and torch.count_nonzero(out) == 0


def test_training_leaves_the_callers_random_streams_and_threads_alone(images_dir, tmp_path):
    """Dropout draws from torch's global generator: the run owns that state (and seeds it from
    ``seed``), the caller's is as before; ``threads`` holds only while it trains."""
    torch.manual_seed(1234)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    out = train_backbone(images_dir, tmp_path / "run", TINY, steps=2, batch_size=2, samples=0,
                         log_every=1, progress=False, threads=threads + 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [rec["threads"] for rec in lines] == [threads + 1, threads + 1]
    # The same run again, with the global stream elsewhere: the same weights.
    torch.manual_seed(99)
    again = train_backbone(images_dir, tmp_path / "again", TINY, steps=2, batch_size=2,
                           samples=0, progress=False, threads=threads + 1)
    a, b = _weights(out / "model.pt"), _weights(again / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_heads_are_a_config_error_and_bugs_are_not(images_dir, tmp_path, monkeypatch):
    kw = dict(steps=1, batch_size=2, samples=0, progress=False)
    # Before, these flags built a model whose first forward failed with a RuntimeError.
    with pytest.raises(ConfigError, match="num_heads 3 does not divide the 64-channel level"):
        train_backbone(images_dir, tmp_path / "o1", {**TINY, "num_heads": 3}, **kw)
    assert not (tmp_path / "o1").exists()

    def broken(flags):
        raise RuntimeError("a bug of ours")

    # Before, any ValueError/RuntimeError/KeyError of the model's construction became a
    # ConfigError blaming the user's flags.
    monkeypatch.setattr("ddpmseg.backbone.train.loop.UNetModel.from_flags", broken)
    with pytest.raises(RuntimeError, match="a bug of ours") as info:
        train_backbone(images_dir, tmp_path / "o2", TINY, **kw)
    assert not isinstance(info.value, ConfigError)

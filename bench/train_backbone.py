"""Backbone training speed: ddpmseg's Trainer against a plain training loop, same run.

Both train the faces_64 architecture (randomly initialised, same seed) on the same in-memory
uint8 images at the same batch size. The plain loop is the obvious one: float images, uniform
steps, noise, q_sample, the UNet, epsilon MSE, AdamW -- no EMA, no flips, no tricks. Ours adds
what train-backbone does (flips, an EMA update, all randomness from its own generator). The two
are measured in alternating rounds after a warm-up so that a busy machine hurts both alike.

Reported: images/s of each (median over rounds), and ours / plain (goal: >= 1, not slower).

    python bench/train_backbone.py [--batch-size N] [--rounds R] [--steps S] [--threads T]
                                   [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ddpmseg.backbone import ModelFlags, UNetModel, get_schedule  # noqa: E402
from ddpmseg.backbone.train import Trainer  # noqa: E402
from ddpmseg.core.device import resolve_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The straightforward DDPM training step."""

    def __init__(self, images: torch.Tensor, flags: ModelFlags, batch: int, device, seed: int):
        torch.manual_seed(seed)
        self.model = UNetModel.from_flags(flags).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        sched = get_schedule(flags.noise_schedule, flags.diffusion_steps)
        self.a = torch.tensor(sched.sqrt_alphas_cumprod, device=device).float()
        self.b = torch.tensor(sched.sqrt_one_minus_alphas_cumprod, device=device).float()
        self.images, self.batch, self.device = images, batch, device
        self.steps = flags.diffusion_steps

    def train_step(self) -> None:
        idx = torch.randint(0, len(self.images), (self.batch,))
        x0 = self.images[idx].to(self.device).float() / 127.5 - 1
        t = torch.randint(0, self.steps, (self.batch,), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.a[t].view(-1, 1, 1, 1) * x0 + self.b[t].view(-1, 1, 1, 1) * noise
        loss = ((self.model(x_t, t) - noise) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def images_per_s(loop, steps: int, batch: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.train_step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="faces_64")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: 8 on CPU, 32 on CUDA")
    ap.add_argument("--rounds", type=int, default=None, help="default: 4")
    ap.add_argument("--steps", type=int, default=None, help="steps per round (default: 3 CPU, "
                                                            "30 CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on CPU, which is steadier and, on "
                         "a shared machine, faster than torch's choice; 0: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                         / "train_backbone.json"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    batch = args.batch_size or (32 if cuda else 8)
    steps = args.steps or (30 if cuda else 3)
    rounds = args.rounds or 4
    flags = ModelFlags.resolve(args.preset)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, flags.image_size, flags.image_size),
                           dtype=torch.uint8, generator=g)

    ours = Trainer(images, flags, None, batch_size=batch, lr=1e-4, ema=0.9999, device=device,
                   seed=0)
    plain = PlainLoop(images, flags, batch, device, seed=0)
    for loop in (ours, plain):  # warm-up (allocator, cuDNN autotuning, thread pools)
        images_per_s(loop, 2, batch, device)
    res = {"ours": [], "plain": []}
    for r in range(rounds):
        order = (("ours", ours), ("plain", plain)) if r % 2 == 0 else \
            (("plain", plain), ("ours", ours))
        for name, loop in order:
            res[name].append(images_per_s(loop, steps, batch, device))
    ours_ips = statistics.median(res["ours"])
    plain_ips = statistics.median(res["plain"])
    result = {
        "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch_size": batch, "steps_per_round": steps, "rounds": rounds,
        "ours_images_per_s": round(ours_ips, 3), "plain_images_per_s": round(plain_ips, 3),
        "ratio_ours_over_plain": round(ours_ips / plain_ips, 3),
        "rounds_ours": [round(x, 3) for x in res["ours"]],
        "rounds_plain": [round(x, 3) for x in res["plain"]],
    }
    print(f"{args.preset} on {device} (batch {batch}): ours {ours_ips:.2f} img/s, "
          f"plain {plain_ips:.2f} img/s, ratio {ours_ips / plain_ips:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = {}
    if out.is_file():
        try:
            existing = json.loads(out.read_text())
        except json.JSONDecodeError:
            existing = {}
    existing[str(device.type)] = result
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

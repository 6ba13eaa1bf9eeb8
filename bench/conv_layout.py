"""Channels-last on the CPU: convolution speed and GroupNorm accuracy, NCHW against it.

Why ADM inference stays NCHW: channels-last convolutions are faster at 64 px and more on the
LSUN-256 model, but PyTorch's channels-last GroupNorm on the CPU is far less accurate (about
1e-5 of the largest value against 1e-7 for NCHW, from its float32 accumulation), enough to
break the 1e-5 parity with the original code on the shared fixtures. This script lists every
convolution that ``decoder_features`` runs on a preset's model (shapes found on the meta
device, so nothing is computed to find them), times each distinct one on random data in both
layouts, the two alternating, and reports the best of --rounds per layout and the ratio,
grouped by map size; then the GroupNorm error of each layout against float64 on the model's
largest normalised map, (batch, 256, 256, 256), with mean 3 and spread 2.

    python bench/conv_layout.py [--preset lsun_256] [--batch 3] [--rounds 3] [--threads 1]

Prints two tables and writes bench/results/conv_layout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ddpmseg.backbone.adm.flags import PRESETS, USUAL_FEATURES  # noqa: E402
from ddpmseg.backbone.adm.unet import UNetModel  # noqa: E402


def conv_calls(preset: str, batch: int) -> Counter:
    """{(input shape, weight shape, stride, padding): calls} of one decoder_features pass."""
    flags = PRESETS[preset]
    with torch.device("meta"):
        model = UNetModel.from_flags(flags).eval()
    calls: Counter = Counter()

    def hook(mod, args, out):
        if mod.weight.dim() == 4:
            calls[(tuple(args[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding)] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    size = flags.image_size
    x = torch.zeros(batch, 3, size, size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with torch.no_grad():  # the direct way: every conv at its own size, as the original runs
        model.decoder_features(x, t, USUAL_FEATURES[preset]["blocks"])
    return calls


def group_norm_error(batch: int, gen: torch.Generator) -> dict[str, float]:
    """Max |GroupNorm - float64 GroupNorm| / max |float64 GroupNorm|, per layout."""
    x = torch.randn(batch, 256, 256, 256, generator=gen) * 2 + 3
    w, b = torch.randn(256, generator=gen), torch.randn(256, generator=gen)
    exact = F.group_norm(x.double(), 32, w.double(), b.double())
    scale = float(exact.abs().max())
    return {name: float((F.group_norm(x.contiguous(memory_format=fmt), 32, w, b).double()
                         - exact).abs().max()) / scale
            for name, fmt in (("NCHW", torch.contiguous_format),
                              ("channels-last", torch.channels_last))}


def best_time(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lsun_256", choices=sorted(USUAL_FEATURES))
    p.add_argument("--batch", type=int, default=3, help="samples per forward (images x steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                        / "conv_layout.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for (shape, wshape, stride, pad), n in sorted(conv_calls(args.preset, args.batch).items(),
                                                     key=lambda kv: -kv[0][0][-1]):
            x = torch.randn(shape, generator=gen)
            w = torch.randn(wshape, generator=gen) * (wshape[1] * wshape[2] * wshape[3]) ** -0.5
            x_cl = x.contiguous(memory_format=torch.channels_last)
            nchw = lambda: F.conv2d(x, w, stride=stride, padding=pad)  # noqa: E731
            nhwc = lambda: F.conv2d(x_cl, w, stride=stride, padding=pad)  # noqa: E731
            nchw(), nhwc()  # first calls pick kernels
            times = {"nchw": float("inf"), "nhwc": float("inf")}
            for r in range(args.rounds):  # alternate, so drift hits both
                for name, fn in ((("nchw", nchw), ("nhwc", nhwc)) if r % 2 == 0
                                 else (("nhwc", nhwc), ("nchw", nchw))):
                    times[name] = min(times[name], best_time(fn, 1))
            rows.append({"input": list(shape), "weight": list(wshape), "calls": n,
                         "nchw_s": times["nchw"], "nhwc_s": times["nhwc"],
                         "speedup": times["nchw"] / times["nhwc"]})
            print(f"  {shape} x {wshape}: {times['nchw'] * 1e3:.1f} / "
                  f"{times['nhwc'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    norm_error = group_norm_error(args.batch, gen)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"[cpu: {machine}; {torch.get_num_threads()} threads; {args.preset}, batch "
          f"{args.batch}; best of {args.rounds}, layouts alternating]")
    print("| map | convolutions | NCHW ms (all calls) | channels-last ms | speedup |")
    print("|---|---|---|---|---|")
    by_size: dict[int, list] = {}
    for r in rows:
        by_size.setdefault(r["input"][-1], []).append(r)
    for size, group in sorted(by_size.items(), reverse=True):
        a = sum(r["nchw_s"] * r["calls"] for r in group)
        b = sum(r["nhwc_s"] * r["calls"] for r in group)
        print(f"| {size}x{size} | {sum(r['calls'] for r in group)} | {a * 1e3:.0f} | "
              f"{b * 1e3:.0f} | {a / b:.2f}x |")
    print("| GroupNorm (32 groups) | max error / max value vs float64 |")
    print("|---|---|")
    for name, err in norm_error.items():
        print(f"| {name} | {err:.2g} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "conv_layout", "preset": args.preset,
                               "batch": args.batch, "threads": torch.get_num_threads(),
                               "machine": machine, "torch": torch.__version__,
                               "rows": rows, "group_norm_error": norm_error}, indent=1)
                   + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

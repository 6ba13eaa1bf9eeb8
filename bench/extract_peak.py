"""Where one LSUN-256 extraction's time goes, and what fraction of the CPU's fp32 peak it reaches.

One image (3 steps as one batch, blocks 5,6,7,8,12, random weights: the architecture of
bench/extract_speed.py) through ``Backbone.activations`` at ``--threads`` under
torch.profiler with FLOP counting: self CPU time per operator kind (convolutions, GroupNorm,
attention matmuls, the rest) and the FLOPs torch counts for convolutions and matmuls. The
peak: ``--flops-per-cycle`` (AVX2 with two FMA units: 2 x 8 fp32 FMA = 32 FLOP per cycle per
core) x the clock (``cpu MHz`` of /proc/cpuinfo unless ``--ghz``) x threads; beside it, the
rate of one large 3x3 convolution measured in the same run (what oneDNN reaches at best here,
turbo included).

    python bench/extract_peak.py [--threads 1] [--ghz 2.45]

Writes bench/results/extract_peak.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddpmseg.backbone import Backbone  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "extract_peak.json"
KINDS = (("convolution", ("conv", "mkldnn_convolution")), ("group_norm", ("group_norm",)),
         ("matmul", ("bmm", "matmul", "addmm", "baddbmm", "mm")),
         ("elementwise", ("add", "mul", "silu", "sigmoid", "copy_", "softmax", "cat", "div")))


def clock_ghz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        return None
    return None


def kind_of(name: str) -> str:
    short = name.removeprefix("aten::")
    for kind, keys in KINDS:
        if any(short == k or short.startswith(k + "_") or short.startswith(k) for k in keys):
            return kind
    return "other"


def best_conv_rate(threads: int) -> float:
    """GFLOP/s of a 256-channel 3x3 convolution at 64 px, batch 3 (best of 3, per thread's
    CPU seconds)."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(3, 256, 64, 64)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.process_time()  # CPU seconds: other jobs share the machine
            conv(x)
            best = min(best, (time.process_time() - t0) / threads)
    return 2 * 3 * 256 * 256 * 9 * 64 * 64 / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ghz", type=float, default=None, help="clock (default: /proc/cpuinfo)")
    ap.add_argument("--flops-per-cycle", type=int, default=32, help="fp32 FLOP/cycle/core")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from extract_speed import MODELS, load_images

    preset, _, folder, steps, blocks = MODELS["lsun_256"]
    bb = Backbone.random(preset, seed=0, device="cpu")
    images, source = load_images(folder, 1, bb.flags.image_size, 0)
    noise = bb.default_noise(bb.flags.image_size, bb.flags.image_size, seed=0)
    conv_rate = best_conv_rate(args.threads)
    from torch.profiler import ProfilerActivity, profile

    t0, c0 = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        bb.activations(images, steps, blocks, noise=noise)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_kind, flops = defaultdict(float), defaultdict(float)
    for ev in prof.key_averages():
        kind = kind_of(ev.key)
        per_kind[kind] += ev.self_cpu_time_total / 1e6
        flops[kind] += ev.flops or 0
    total = sum(per_kind.values())
    ghz = args.ghz or clock_ghz()
    peak = args.flops_per_cycle * ghz * args.threads if ghz else None
    all_flops = sum(flops.values())
    result = {
        "benchmark": "extract_peak", "model": "lsun_256 (random weights)", "images": source,
        "steps": list(steps), "blocks": list(blocks), "threads": args.threads,
        "wall_s": wall, "process_cpu_s": cpu,
        "self_cpu_s_by_kind": dict(per_kind),
        "share_by_kind": {k: v / total for k, v in per_kind.items()},
        "counted_gflop": {k: v / 1e9 for k, v in flops.items() if v},
        # Profiler times are wall clock (inflated when other jobs take the core): rates use
        # each kind's share of the process CPU seconds instead.
        "conv_gflops_achieved": flops["convolution"] / (
            per_kind["convolution"] / total * cpu / args.threads) / 1e9,
        "overall_gflops_achieved": all_flops / (cpu / args.threads) / 1e9,
        "clock_ghz": ghz, "flops_per_cycle_per_core": args.flops_per_cycle,
        "nominal_peak_gflops": peak, "best_single_conv_gflops": conv_rate,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
                   "shared with other jobs (profiled once: a figure of where time goes, "
                   "not a timing contest)"}
    if peak:
        result["conv_fraction_of_nominal_peak"] = result["conv_gflops_achieved"] / peak
        result["overall_fraction_of_nominal_peak"] = result["overall_gflops_achieved"] / peak
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

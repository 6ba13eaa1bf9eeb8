"""The first layer's column order, before and after commit befd1a1, at the same seeds.

Before befd1a1 the streaming trainer received minibatch features in "pool order" (resolution
groups one after another) and permuted the first Linear layer's input columns to match, after
the member had been built (and initialised) in the reference's order; befd1a1 made MapLayout
write the reference's order and dropped the permutation. This script trains the same
ensembles with either version of the code, so the two can be compared member by member.

    # once per version, the code root first on the path (a plain export of each commit):
    git archive befd1a1^ | tar -x -C /tmp/order_old
    git archive befd1a1  | tar -x -C /tmp/order_new
    PYTHONPATH=/tmp/order_new python bench/column_order.py run --tag new
    PYTHONPATH=/tmp/order_old python bench/column_order.py run --tag old
    python bench/column_order.py compare          # any version: reads the two runs' files

``run``: on each set (default ffhq_34 and celeba_19 at 64 px, bundled faces_64, the faces64
config with the set's classes, etf none and shared), extracts train/test stores once (shared by
both tags: the commit did not touch the store), fits one ensemble per classifier seed, predicts
(soft vote) and scores mIoU. ``compare``: per set, mode and seed, the largest difference
between the two versions' member weights and the paired mIoU difference (new - old), with
their mean and sample std against the seeds' own spread.
Writes bench/results/column_order.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE.parents[1] / "shared" / "data"
RESULT = HERE / "results" / "column_order.json"


def replace(cfg, **sections):
    """``Config.replace`` (``with_overrides`` in the old versions)."""
    return getattr(cfg, "replace", None)(**sections) if hasattr(cfg, "replace") \
        else cfg.with_overrides(**sections)


def set_config(name: str, members: int):
    from ddpmseg import load_config

    cfg = load_config("faces64_ffhq_34")
    if name != "ffhq_34":
        cfg = dataclasses.replace(cfg, data=load_config(name).data)
    return replace(cfg, classifier={"ensemble": members})


def run(args) -> None:
    import torch
    import numpy as np
    import ddpmseg
    from ddpmseg import evaluate, extract, fit, predict
    from ddpmseg.data import list_samples, load_mask

    torch.set_num_threads(1)
    print(f"code: {Path(ddpmseg.__file__).parent}", file=sys.stderr)
    for name in args.sets:
        cfg = set_config(name, args.members)
        data = Path(args.data_root) / name / "real"
        work = Path(args.work) / name
        stores = {s: extract(data / s, work / f"{s}.zarr", cfg, device="cpu", resize=True,
                             progress=False) for s in ("train", "test")}
        gt = work / "gt_64"
        gt.mkdir(parents=True, exist_ok=True)
        for s in list_samples(data / "test", require_masks=True):
            if not (gt / f"{s.name}.npy").is_file():
                np.save(gt / f"{s.name}.npy", load_mask(s.mask, (64, 64), resize=True))
        scores = {}
        for mode in args.modes:
            for seed in args.seeds:
                tag = f"{mode}_s{seed}"
                run_dir, pred = work / args.tag / tag, work / args.tag / f"pred_{tag}"
                t0 = time.perf_counter()
                fit(stores["train"], run_dir, replace(cfg, classifier={"etf": mode, "seed": seed}),
                    device="cpu", resume=False, progress=False)
                if pred.exists():
                    shutil.rmtree(pred)
                predict(run_dir, work / "test.zarr", pred, vote="soft", device="cpu",
                        progress=False, at_model_size=True)  # the 64 px masks
                r = evaluate(pred, gt, num_classes=cfg.data.num_classes,
                             ignore_label=cfg.data.ignore_label, write=False)
                scores[tag] = 100.0 * r["miou"]
                print(f"  {args.tag} {name} {tag}: mIoU {scores[tag]:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        (work / args.tag / "scores.json").write_text(json.dumps(scores, indent=1))


def max_weight_diff(a: Path, b: Path) -> float:
    import torch

    worst = 0.0
    for pa in sorted(a.glob("member_*")):
        sa = torch.load(pa, map_location="cpu", weights_only=False)["state_dict"]
        sb = torch.load(b / pa.name, map_location="cpu", weights_only=False)["state_dict"]
        for key, v in sa.items():
            if v.is_floating_point():
                worst = max(worst, float((v - sb[key]).abs().max()))
    return worst


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def compare(args) -> dict:
    sets = []
    for name in args.sets:
        work = Path(args.work) / name
        old = json.loads((work / "old" / "scores.json").read_text())
        new = json.loads((work / "new" / "scores.json").read_text())
        for mode in args.modes:
            tags = [f"{mode}_s{s}" for s in args.seeds]
            diffs = [new[t] - old[t] for t in tags]
            sets.append({
                "set": name, "etf": mode, "seeds": args.seeds,
                "old_miou": [old[t] for t in tags], "new_miou": [new[t] for t in tags],
                "old": stats([old[t] for t in tags]), "new": stats([new[t] for t in tags]),
                "paired_new_minus_old": diffs, "paired": stats(diffs),
                "max_member_weight_diff": [max_weight_diff(work / "old" / t, work / "new" / t)
                                           for t in tags]})
    return {"sets": sets}


def rounding_growth(dim: int = 1344, num_classes: int = 34, steps: int = 1000,
                    seed: int = 0) -> dict:
    """How far two copies of one member drift when the only difference is the first layer's
    column order (the old trainer's permuted copy vs the new unpermuted one), trained with Adam
    on the same minibatches (random features and labels, 64 pixels, the faces64 layout's
    permutation): the largest |logit difference| on a fixed batch at a few steps."""
    import torch
    from ddpmseg.classifier.model import PixelMLP

    torch.manual_seed(seed)
    a = PixelMLP(dim, num_classes)
    b = PixelMLP(dim, num_classes, init=False)
    b.load_state_dict(a.state_dict())
    widths, sizes = [128, 96, 96, 64, 64], [16, 16, 32, 32, 64]   # faces64: blocks 2,4,5,7,8
    cols, start = [], 0
    for _t in range(3):
        for c, sz in zip(widths, sizes):
            cols.append((sz, torch.arange(start, start + c)))
            start += c
    perm = torch.cat([idx for sz in dict.fromkeys(sizes) for size, idx in cols if size == sz])
    with torch.no_grad():
        b.layers[0].weight.copy_(b.layers[0].weight[:, perm])
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (a, b)]
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(256, dim, generator=gen)
    growth = {}
    for step in range(steps + 1):
        if step in (0, 1, 10, 100, 1000, steps):
            a.eval(), b.eval()
            with torch.no_grad():
                growth[step] = float((a(probe) - b(probe[:, perm])).abs().max())
            a.train(), b.train()
        if step == steps:
            break
        x = torch.randn(64, dim, generator=gen)
        y = torch.randint(0, num_classes, (64,), generator=gen)
        for m, opt, xin in ((a, opts[0], x), (b, opts[1], x[:, perm])):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(xin), y).backward()
            opt.step()
    return growth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("run", "compare"))
    ap.add_argument("--tag", choices=("old", "new"), help="run: which version this is")
    ap.add_argument("--sets", default="ffhq_34,celeba_19")
    ap.add_argument("--modes", default="none,shared", help="etf modes")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--seeds", default="0,3,6")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--work", default="/tmp/ddpmseg_column_order")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    args.sets = args.sets.split(",")
    args.modes = args.modes.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.what == "run":
        if not args.tag:
            ap.error("run needs --tag old or --tag new")
        run(args)
        return 0
    import torch
    torch.set_num_threads(1)
    result = compare(args)
    result.update(benchmark="column_order", members=args.members,
                  note="runs split over two work dirs (seeds 0-2, 3-4) on a shared machine; "
                       "stores extracted once by befd1a1, read by both versions",
                  commit="befd1a1 (new) against its parent (old)",
                  rounding_growth_max_abs_logit_diff=rounding_growth(),
                  machine="2-core AMD EPYC (AVX2), shared with other jobs; 1 torch thread")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for s in result["sets"]:
        print(f"{s['set']} etf {s['etf']}: old {s['old']['mean']:.2f} +- {s['old']['std']:.2f}, "
              f"new {s['new']['mean']:.2f} +- {s['new']['std']:.2f}, paired new-old "
              f"{s['paired']['mean']:+.2f} +- {s['paired']['std']:.2f}; max member weight diff "
              + ", ".join(f"{d:.2g}" for d in s["max_member_weight_diff"]))
    print(f"same member, permuted first-layer columns, same minibatches: max |logit diff| by "
          f"step {result['rounding_growth_max_abs_logit_diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed's ablation table on one benchmark set: DDPM, DDPM_V, DDPM_E, DDPM_VE.

    DDPM     etf none,                hard vote (per-pixel majority of the members)
    DDPM_V   etf none,                soft vote (mean of the members' softmax)
    DDPM_E   ETF regulariser,         hard vote
    DDPM_VE  ETF regulariser,         soft vote

each as mean +- std (sample std, ddof=1) of the test mIoU (reference definition: ignore pixels
not masked, empty union = 0) over classifier seeds; the ETF rows for both ``etf shared`` (the
ETF head reads the classifier's own penultimate features) and ``etf separate`` (the seed's
code: a trunk of its own, which cannot change the classifier). Votes are a predict-time option,
so one fit serves the hard and the soft row: 3 ETF modes x len(seeds) fits of K members.

Features are extracted once per set (train and test stores under --work, reused by later
runs); ground truth for evaluation is the test masks brought to the model's size with nearest
resampling (as `--resize` does), written once beside the stores.

Also measured, on the same features: one fit with ``in_memory=True`` against the streaming fit
of the same config and seed (the classifier is designed to give the same minibatches either way:
are the members' weights and the predictions identical?), whether ``etf separate`` predicts
exactly as ``etf none`` (it should: the separate trunk shares nothing with the classifier), and
the majority-class baseline (every pixel predicted as the test set's most frequent class).

Seeds: member k of a fit with classifier seed s is trained with seed s + k, so with K members
the ensembles of seeds 0, 1, 2 would share members (seed 0 = {0,1,2}, seed 1 = {1,2,3}, ...)
and their spread would understate the seed-to-seed variation. The default seeds are therefore
0, K, 2K (disjoint member seeds); ``--seeds 0,1,2`` gives the overlapping ones.

Default: the bundled faces64 backbone (adm_faces64, 64px) on ffhq_34, images bilinearly and
masks nearest downscaled from 256 to 64 px. ``--set celeba_19`` uses the same backbone with
celeba_19's classes. Any set / config / checkpoint / preset by option.

    python bench/ablation.py [--set ffhq_34] [--members 3] [--seeds 0,3,6] [--threads 1]
                             [--config CFG] [--checkpoint FILE] [--preset NAME]
                             [--data-root ../shared/data] [--work DIR] [--no-resize]

Writes bench/results/ablation_<set>.md and .json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
FACES64 = "faces64_ffhq_34"
MODES = ("none", "shared", "separate")
VOTES = ("hard", "soft")


def build_config(args):
    """The run config: --config as given, else faces64 (model, features, classifier, predict)
    with the data section of the set's bundled config."""
    from ddpmseg import load_config

    if args.config:
        cfg = load_config(args.config)
    else:
        base = load_config(FACES64)
        if args.set != "ffhq_34":
            cfg_set = load_config(args.set)
            import dataclasses
            base = dataclasses.replace(base, data=cfg_set.data)
        cfg = base
    model = {}
    if args.checkpoint:
        model["checkpoint"] = args.checkpoint
    if args.preset:
        model["preset"] = args.preset
    return cfg.replace(model=model, classifier={"ensemble": args.members})


def write_ground_truth(test_dir: Path, gt_dir: Path, size: tuple[int, int], resize: bool) -> int:
    """Test masks at the model's size (nearest, as extract --resize does), as <name>.npy."""
    from ddpmseg.data import list_samples, load_mask

    samples = list_samples(test_dir, require_masks=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for s in samples:
        out = gt_dir / f"{s.name}.npy"
        if not out.is_file():
            np.save(out, load_mask(s.mask, size, resize=resize))
    return len(samples)


def majority_baseline(gt_dir: Path, num_classes: int, ignore_label: int) -> dict:
    """mIoU of predicting the test set's most frequent (non-ignored) class everywhere."""
    from ddpmseg.outputs.evaluate import confusion_matrix, iou_from_confusion

    masks = [np.load(p) for p in sorted(gt_dir.glob("*.npy"))]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)
    if 0 <= ignore_label < 256:
        counts[ignore_label] = 0
    major = int(counts[:num_classes].argmax())
    conf = sum(confusion_matrix(np.full_like(m, major), m) for m in masks)
    _, miou = iou_from_confusion(conf, num_classes, ignore_label)
    return {"class": major, "miou": miou}


def predictions(pred_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(pred_dir.glob("*.npy"))}


def same_predictions(a: Path, b: Path) -> tuple[bool, int]:
    """(identical?, number of differing pixels) of two prediction folders."""
    pa, pb = predictions(a), predictions(b)
    if pa.keys() != pb.keys():
        return False, -1
    diff = sum(int((pa[k] != pb[k]).sum()) for k in pa)
    return diff == 0, diff


def member_weight_diff(run_a: Path, run_b: Path) -> float:
    """Largest |difference| over every parameter of every member of two runs."""
    import torch

    worst = 0.0
    members = sorted(run_a.glob("member_*"))
    if not members:
        raise SystemExit(f"no members found in {run_a}")
    for pa in members:
        sa = torch.load(pa, map_location="cpu", weights_only=False)["state_dict"]
        sb = torch.load(run_b / pa.name, map_location="cpu", weights_only=False)["state_dict"]
        for key, value in sa.items():
            if value.is_floating_point():
                worst = max(worst, float((value - sb[key]).abs().max()))
            elif not torch.equal(value, sb[key]):
                worst = float("inf")
    return worst


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="ffhq_34", help="benchmark set under --data-root")
    ap.add_argument("--config", default=None,
                    help="config name or TOML (default: faces64 backbone + the set's classes)")
    ap.add_argument("--checkpoint", default=None, help="override model.checkpoint")
    ap.add_argument("--preset", default=None, help="override model.preset")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--split", default="real", help="folder under the set (holds train/ test/)")
    ap.add_argument("--members", type=int, default=3, help="ensemble size K per fit")
    ap.add_argument("--seeds", default=None,
                    help="classifier seeds, comma-separated (default 0,K,2K: disjoint members)")
    ap.add_argument("--no-resize", dest="resize", action="store_false",
                    help="images already have the model's size (default: resize to it)")
    ap.add_argument("--inmem-etf", default="shared", choices=MODES,
                    help="ETF mode of the streaming-vs-in-memory comparison (first seed)")
    ap.add_argument("--work", default=None,
                    help="stores, runs and predictions (default /tmp/ddpmseg_ablation/<set>)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/ablation_<set>)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(max(1, args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging
    logging.basicConfig(level=logging.WARNING)

    from ddpmseg.core.version import __version__
    from ddpmseg.classifier import fit
    from ddpmseg.outputs.evaluate import evaluate
    from ddpmseg.pipelines.extract import extract
    from ddpmseg.pipelines.predict import predict

    cfg = build_config(args)
    K = args.members
    seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds else [0, K, 2 * K])
    data = Path(args.data_root) / args.set / args.split
    train_dir, test_dir = data / "train", data / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise SystemExit(f"error: {d} does not exist; give --data-root / --set / --split")
    work = Path(args.work or f"/tmp/ddpmseg_ablation/{args.set}")
    work.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"ablation_{args.set}"
    dc = cfg.data
    t_all = time.perf_counter()

    # -- features, once per set --------------------------------------------------------------
    timings = {}
    stores = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        t0 = time.perf_counter()
        stores[split] = extract(folder, work / f"{split}.zarr", cfg, device=args.device,
                                resize=args.resize, progress=False)
        timings[f"extract_{split}_s"] = round(time.perf_counter() - t0, 1)
        print(f"features {split}: {stores[split].info.num_images} images "
              f"({timings[f'extract_{split}_s']} s)", flush=True)
    info = stores["train"].info
    size = tuple(info.image_size)
    gt_dir = work / f"gt_{size[0]}x{size[1]}"
    n_test = write_ground_truth(test_dir, gt_dir, size, args.resize)
    baseline = majority_baseline(gt_dir, dc.num_classes, dc.ignore_label)

    def score(pred_dir: Path) -> float:
        r = evaluate(pred_dir, gt_dir, num_classes=dc.num_classes, ignore_label=dc.ignore_label,
                     class_names=dc.class_names, write=False)
        return 100.0 * r["miou"]  # evaluate returns a fraction

    def fit_and_score(mode: str, seed: int, in_memory: bool = False) -> tuple[Path, dict, float]:
        c = cfg.replace(classifier={"etf": mode, "seed": seed, "ensemble": K})
        tag = f"{mode}_s{seed}" + ("_inmem" if in_memory else "")
        run = work / "runs" / tag
        t0 = time.perf_counter()
        fit(stores["train"], run, c, device=args.device, in_memory=in_memory, resume=False,
            progress=False)
        t_fit = time.perf_counter() - t0
        out = {}
        for vote in VOTES:
            pred_dir = work / "preds" / f"{tag}_{vote}"
            if pred_dir.exists():
                shutil.rmtree(pred_dir)
            predict(run, work / "test.zarr", pred_dir, vote=vote, device=args.device, progress=False,
                    at_model_size=True)  # scored against the 64 px masks, as published
            out[vote] = score(pred_dir)
        print(f"  etf {mode:<8} seed {seed}{' in-memory' if in_memory else ''}: "
              f"hard {out['hard']:.2f}  soft {out['soft']:.2f}  (fit {t_fit:.0f} s)", flush=True)
        return run, out, t_fit

    # -- the fits -------------------------------------------------------------------------------
    scores: dict[str, dict[str, list[float]]] = {m: {v: [] for v in VOTES} for m in MODES}
    fit_seconds = []
    for mode in MODES:
        for seed in seeds:
            _, out, t_fit = fit_and_score(mode, seed)
            fit_seconds.append(t_fit)
            for vote in VOTES:
                scores[mode][vote].append(out[vote])

    # -- separate == none? (the separate trunk cannot change the classifier) -----------------
    separate_vs_none = []
    for seed in seeds:
        for vote in VOTES:
            same, diff = same_predictions(work / "preds" / f"none_s{seed}_{vote}",
                                          work / "preds" / f"separate_s{seed}_{vote}")
            separate_vs_none.append({"seed": seed, "vote": vote, "identical": same,
                                     "differing_pixels": diff})

    # -- streaming vs in memory, same features, same config and seed --------------------------
    s0, m0 = seeds[0], args.inmem_etf
    run_mem, out_mem, t_mem = fit_and_score(m0, s0, in_memory=True)
    run_str = work / "runs" / f"{m0}_s{s0}"
    inmem = {"etf": m0, "seed": s0, "weights_max_abs_diff": member_weight_diff(run_str, run_mem),
             "fit_seconds_in_memory": round(t_mem, 1), "votes": {}}
    for vote in VOTES:
        same, diff = same_predictions(work / "preds" / f"{m0}_s{s0}_{vote}",
                                      work / "preds" / f"{m0}_s{s0}_inmem_{vote}")
        inmem["votes"][vote] = {"identical": same, "differing_pixels": diff,
                                "miou_streaming": scores[m0][vote][0],
                                "miou_in_memory": out_mem[vote]}
    inmem["identical"] = all(v["identical"] for v in inmem["votes"].values())

    # -- the table ------------------------------------------------------------------------------
    rows = []
    for name, mode, vote in (("DDPM", "none", "hard"), ("DDPM_V", "none", "soft"),
                             ("DDPM_E", "shared", "hard"), ("DDPM_VE", "shared", "soft"),
                             ("DDPM_E", "separate", "hard"), ("DDPM_VE", "separate", "soft")):
        vals = scores[mode][vote]
        mean, std = mean_std(vals)
        rows.append({"method": name, "etf": mode, "vote": vote, "mean": mean, "std": std,
                     "per_seed": vals})
    timings["fit_mean_s"] = round(statistics.fmean(fit_seconds), 1)
    timings["total_s"] = round(time.perf_counter() - t_all, 1)

    checkpoint = cfg.model.checkpoint or "(none)"
    backbone = (f"{checkpoint} (preset {cfg.model.preset}, "
                f"sha256 {info.spec.backbone.sha256[:12] or '?'})")
    setup = {
        "set": args.set, "split": f"{args.split}: {info.num_images} train / {n_test} test "
                                  f"images ({train_dir} , {test_dir})",
        "backbone": backbone, "image_size": f"{size[0]}x{size[1]}",
        "resize": (f"yes: images bilinear, masks nearest, to {size[0]}x{size[1]}"
                   if args.resize else "no"),
        "steps": list(info.steps), "blocks": list(info.blocks), "feature_dim": info.feature_dim,
        "noise_seed": info.seed, "feature_dtype": info.dtype,
        "members": K, "seeds": seeds, "member_seeds": {s: [s + k for k in range(K)] for s in seeds},
        "max_epochs": cfg.classifier.max_epochs, "etf_weight": cfg.classifier.etf_weight,
        "num_classes": dc.num_classes, "ignore_label": dc.ignore_label,
        "miou": "reference definition (ignore pixels not masked, empty union = 0), percent",
        "device": args.device, "torch_threads": args.threads, "ddpmseg": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    md = render_markdown(setup, rows, baseline, inmem, separate_vs_none, timings)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(json.dumps(
        {"setup": setup, "rows": rows, "majority_baseline": baseline,
         "streaming_vs_in_memory": inmem, "separate_vs_none": separate_vs_none,
         "timings": timings, "config": cfg.to_dict()}, indent=1, default=str) + "\n")
    print()
    print(md)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


def render_markdown(setup, rows, baseline, inmem, sep, timings) -> str:
    seeds = setup["seeds"]
    lines = [f"# Ablation on {setup['set']}", ""]
    for key in ("backbone", "image_size", "resize", "split", "steps", "blocks", "feature_dim",
                "members", "seeds", "max_epochs", "miou", "device", "torch_threads"):
        lines.append(f"- {key}: {setup[key]}")
    lines += ["", "| method | ETF | vote | mIoU mean +- std | per seed (" +
              ", ".join(str(s) for s in seeds) + ") |", "|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{v:.2f}" for v in r["per_seed"])
        lines.append(f"| {r['method']} | {r['etf']} | {r['vote']} | "
                     f"{r['mean']:.2f} +- {r['std']:.2f} | {per} |")
    lines.append(f"| majority class ({baseline['class']}) | - | - | "
                 f"{100 * baseline['miou']:.2f} | - |")
    lines += ["", f"Streaming vs in-memory fit (etf {inmem['etf']}, seed {inmem['seed']}, same "
              f"features): predictions identical: **{'yes' if inmem['identical'] else 'no'}**; "
              f"largest member weight difference {inmem['weights_max_abs_diff']:.3g}; "
              + "; ".join(f"{v}: {d['differing_pixels']} differing pixels, mIoU "
                          f"{d['miou_streaming']:.2f} vs {d['miou_in_memory']:.2f}"
                          for v, d in inmem["votes"].items()) + "."]
    all_same = all(s["identical"] for s in sep)
    lines += ["", f"etf separate predicts exactly as etf none (same seed, both votes): "
              f"**{'yes' if all_same else 'no'}**" + ("" if all_same else " (" + ", ".join(
                  f"seed {s['seed']} {s['vote']}: {s['differing_pixels']} px" for s in sep) + ")")
              + "."]
    lines += ["", f"Time: extract train {timings['extract_train_s']} s, test "
              f"{timings['extract_test_s']} s; one fit of {setup['members']} members "
              f"{timings['fit_mean_s']} s on average; total {timings['total_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

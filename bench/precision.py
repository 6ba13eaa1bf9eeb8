"""Reduced precision judged by accuracy: bf16 extraction and bf16 / fp16 stores against fp32.

Accuracy (``--part accuracy``): on each set (default ffhq_34 and celeba_19, images bilinearly
and masks nearest downscaled to 64 px, the bundled faces_64 backbone, the faces64 config's
features and classifier), features are extracted once per variant

    fp32         precision fp32, store float32     (the reference point)
    fp32_f16     precision fp32, store float16     (the package's default store dtype)
    fp32_bf16    precision fp32, store bfloat16
    bf16         precision bf16, store float32     (bf16 extraction alone)
    bf16_bf16    precision bf16, store bfloat16    (the whole fast path)

and one ensemble of K members is fitted per classifier seed, the same seeds for every variant
(0, K, 2K: disjoint member seeds), and scored on the test split (soft vote, reference mIoU,
percent). Figures: per variant the mIoU per seed, the paired differences against fp32 at the
same seed (mean, sample std over seeds) and the seeds' spread (sample std of the fp32 mIoU);
a variant "is within the spread" when |mean paired difference| <= the fp32 seeds' std.

Speed (``--part speed``): ``Backbone.activations`` of one image at a time, fp32 and bf16
interleaved (the order flips every image), at 1 and 2 torch threads, on faces_64 (the bundled
checkpoint, 64 px) and the lsun_256 architecture (random weights, 256 px, as
bench/extract_speed.py; a few images only). Figure: median per-image seconds and the median of
per-image ratios fp32 / bf16. The machine's CPU flags (native bf16 or not) are recorded: on a
CPU without AMX / AVX512-BF16, bf16 is emulated and this measures the emulation.

    python bench/precision.py [--part accuracy|speed|both] [--sets ffhq_34,celeba_19]
                              [--variants fp32,fp32_f16,...] [--members 3] [--seeds 0,3,6]
                              [--speed-images 64:6,256:2] [--work DIR]

Writes bench/results/precision.json (each part replaces its own key, the other is kept) and
prints the tables in markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout
sys.path.insert(0, str(REPO / "bench"))

DATA_ROOT = REPO.parent / "shared" / "data"
RESULT = REPO / "bench" / "results" / "precision.json"
VARIANTS = {"fp32": ("fp32", "float32"), "bf16": ("bf16", "float32"),
            "fp32_f16": ("fp32", "float16"), "fp32_bf16": ("fp32", "bfloat16"),
            "bf16_bf16": ("bf16", "bfloat16")}


def set_config(name: str, members: int):
    """The faces64 config (model, features, classifier) with the data section of ``name``."""
    from ddpmseg import load_config

    cfg = load_config("faces64_ffhq_34")
    if name != "ffhq_34":
        cfg = dataclasses.replace(cfg, data=load_config(name).data)
    return cfg.replace(classifier={"ensemble": members})


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def test_folder(folder: Path, work: Path, n: int | None) -> Path:
    """``folder``, or a folder of links to its first ``n`` images and masks (by name)."""
    if n is None:
        return folder
    sub = work / f"test_first{n}"
    sub.mkdir(parents=True, exist_ok=True)
    for image in sorted(folder.glob("*.png"))[:n]:
        for f in (image, image.with_suffix(".npy")):
            if not (sub / f.name).exists():
                (sub / f.name).symlink_to(f.resolve())
    return sub


def earlier_rows(out: Path, name: str) -> tuple[dict, dict]:
    """Scores and seconds of the variants of set ``name`` already in ``out`` (another run of
    this script, e.g. the fp32 reference while this one runs another variant)."""
    scores, seconds = {}, {}
    old = json.loads(out.read_text()) if out.is_file() else {}
    for table in old.get("accuracy", {}).get("sets", []):
        if table["set"] == name:
            for row in table["rows"]:
                scores[row["variant"]] = row["miou_per_seed"]
                seconds[row["variant"]] = {"extract_s": row["extract_s"], "fit_s": row["fit_s"]}
    return scores, seconds


def accuracy_one_set(name: str, args, save) -> dict:
    """Extract every variant's train/test stores, fit and score each seed; the paired table
    (``save(table)`` after each variant, so that a long run leaves what it has)."""
    from ablation import write_ground_truth
    from ddpmseg.classifier import fit
    from ddpmseg.outputs.evaluate import evaluate
    from ddpmseg.pipelines.extract import extract
    from ddpmseg.pipelines.predict import predict

    base = set_config(name, args.members)
    data = Path(args.data_root) / name / "real"
    work = Path(args.work) / name
    folders = {"train": data / "train", "test": test_folder(data / "test", work, args.test_images)}
    gt_dir = work / "gt_64"
    write_ground_truth(folders["test"], gt_dir, (64, 64), True)
    dc = base.data
    scores, seconds = earlier_rows(Path(args.out), name)
    for variant in args.variants:
        if variant in scores:
            scores.pop(variant)  # measured again here
        precision, dtype = VARIANTS[variant]
        cfg = base.replace(features={"precision": precision, "dtype": dtype})
        t0 = time.perf_counter()
        stores = {split: extract(folders[split], work / variant / f"{split}.zarr", cfg,
                                 device="cpu", resize=True, progress=False,
                                 scheduler=args.scheduler)
                  for split in ("train", "test")}
        seconds[variant] = {"extract_s": round(time.perf_counter() - t0, 1), "fit_s": []}
        scores[variant] = []
        for seed in args.seeds:
            run = work / variant / f"run_s{seed}"
            pred = work / variant / f"pred_s{seed}"
            t0 = time.perf_counter()
            fit(stores["train"], run, cfg.replace(classifier={"seed": seed}), device="cpu",
                resume=False, progress=False)
            seconds[variant]["fit_s"].append(round(time.perf_counter() - t0, 1))
            if pred.exists():
                shutil.rmtree(pred)
            predict(run, work / variant / "test.zarr", pred, vote="soft", device="cpu",
                    progress=False, at_model_size=True)  # the 64 px masks
            r = evaluate(pred, gt_dir, num_classes=dc.num_classes, ignore_label=dc.ignore_label,
                         class_names=dc.class_names, write=False)
            scores[variant].append(100.0 * r["miou"])
            print(f"  {name} {variant} seed {seed}: mIoU {scores[variant][-1]:.2f}",
                  file=sys.stderr, flush=True)
        save(paired_table(name, args, dc.num_classes, scores, seconds))
    return paired_table(name, args, dc.num_classes, scores, seconds)


def paired_table(name, args, num_classes, scores, seconds) -> dict:
    """Per variant: mIoU per seed, mean +- std, and the paired differences against fp32."""
    ref = scores.get("fp32")
    rows = []
    for variant, vals in scores.items():
        mean, std = spread(vals)
        row = {"variant": variant, "precision": VARIANTS[variant][0],
               "store_dtype": VARIANTS[variant][1], "miou_per_seed": vals,
               "miou_mean": mean, "miou_std": std, **seconds[variant]}
        if ref is not None and variant != "fp32":
            d = [v - r for v, r in zip(vals, ref)]
            dmean, dstd = spread(d)
            row.update(paired_diff_per_seed=d, paired_diff_mean=dmean, paired_diff_std=dstd,
                       within_seed_spread=abs(dmean) <= spread(ref)[1])
        rows.append(row)
    return {"set": name, "num_classes": num_classes, "seeds": args.seeds,
            "test_images": args.test_images or "all",
            "member_seeds": {s: [s + k for k in range(args.members)] for s in args.seeds},
            "fp32_seed_std": spread(ref)[1] if ref else None, "rows": rows}


def merge_runs(files: list[Path], args) -> dict:
    """Runs of this script split by seed or variant, as one: per set and variant, the mIoU of
    every seed measured (in seed order), and the paired table recomputed; speed from the last
    file that has it."""
    merged: dict = {}
    seen: dict[str, dict] = {}
    for f in files:
        part = json.loads(f.read_text())
        if "speed" in part:
            merged["speed"] = part["speed"]
        acc = part.get("accuracy")
        if not acc:
            continue
        merged.setdefault("accuracy", {k: v for k, v in acc.items() if k != "sets"})
        for table in acc["sets"]:
            entry = seen.setdefault(table["set"], {"num_classes": table["num_classes"],
                                                   "scores": {}, "seconds": {}})
            for row in table["rows"]:
                per = entry["scores"].setdefault(row["variant"], {})
                secs = entry["seconds"].setdefault(row["variant"],
                                                   {"extract_s": row["extract_s"], "fit_s": []})
                for seed, value, fit_s in zip(table["seeds"], row["miou_per_seed"],
                                              row["fit_s"]):
                    per[seed] = value
                    secs["fit_s"].append(fit_s)
    sets = []
    for name, entry in seen.items():
        # Paired by seed: only the seeds every variant has.
        seeds = sorted(set.intersection(*(set(per) for per in entry["scores"].values())))
        args.seeds = seeds
        scores = {v: [per[s] for s in seeds] for v, per in entry["scores"].items()}
        sets.append(paired_table(name, args, entry["num_classes"], scores, entry["seconds"]))
    if "accuracy" in merged:
        merged["accuracy"]["sets"] = sets
        merged["accuracy"]["merged_from"] = [str(f) for f in files]
    return merged


def time_model(name: str, n_images: int, threads: int) -> dict:
    """fp32 vs bf16 ``activations`` of one image at a time, interleaved, at ``threads``."""
    import torch
    from extract_speed import MODELS, load_images
    from ddpmseg.backbone import Backbone

    preset, checkpoint, folder, steps, blocks = MODELS[name]
    torch.set_num_threads(threads)
    bb = (Backbone.from_checkpoint(checkpoint, preset, device="cpu") if checkpoint
          else Backbone.random(preset, seed=0, device="cpu"))
    size = bb.flags.image_size
    images, source = load_images(folder, n_images + 1, size, 0)
    noise = bb.default_noise(size, size, seed=0)
    for precision in ("fp32", "bf16"):  # untimed warm-up, an image of its own
        bb.activations(images[-1:], steps, blocks, noise=noise, precision=precision)
    per = {"fp32": [], "bf16": []}
    worst = 0.0
    for i in range(n_images):
        out = {}
        for precision in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            t0 = time.perf_counter()
            out[precision] = bb.activations(images[i:i + 1], steps, blocks, noise=noise,
                                            precision=precision)
            per[precision].append(time.perf_counter() - t0)
        for key, ref in out["fp32"].items():
            worst = max(worst, float((out["bf16"][key] - ref).norm() / ref.norm()))
    ratios = [a / b for a, b in zip(per["fp32"], per["bf16"])]
    result = {"model": name, "threads": threads, "images": source, "image_size": size,
              "fp32_s_per_image": per["fp32"], "bf16_s_per_image": per["bf16"],
              "fp32_median_s": statistics.median(per["fp32"]),
              "bf16_median_s": statistics.median(per["bf16"]),
              "fp32_min_s": min(per["fp32"]), "bf16_min_s": min(per["bf16"]),
              "speedup_median": statistics.median(ratios),
              "worst_relative_l2_error": worst}
    print(f"  {name} {threads} thread(s): fp32 {result['fp32_median_s']:.2f} s, bf16 "
          f"{result['bf16_median_s']:.2f} s, bf16 speed-up {result['speedup_median']:.2f}x",
          file=sys.stderr, flush=True)
    return result


def conv_probe(channels: int, size: int, threads: int, repeats: int = 2) -> dict:
    """One 3x3 convolution of the lsun_256 decoder's kind (batch 3: the steps of one image),
    fp32 against bf16 autocast, best process CPU seconds of ``repeats``, interleaved."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(3, channels, size, size, generator=gen)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(repeats):
        for precision in best:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                        enabled=precision == "bf16"):
                t0 = time.perf_counter()
                conv(x)
                best[precision] = min(best[precision], time.perf_counter() - t0)
    flop = 2 * 3 * channels * channels * 9 * size * size
    result = {"model": f"lsun_256 conv {channels}ch {size}px (batch 3)", "threads": threads,
              "fp32_median_s": best["fp32"], "bf16_median_s": best["bf16"],
              "speedup_median": best["fp32"] / best["bf16"],
              "fp32_gflops": flop / best["fp32"] / 1e9, "worst_relative_l2_error": float("nan"),
              "note": "best of repeats, one conv (the full model in bf16 would take hours here)"}
    print(f"  {result['model']} {threads} thread(s): fp32 {best['fp32']:.3f} s, bf16 "
          f"{best['bf16']:.3f} s", file=sys.stderr, flush=True)
    return result


def machine() -> dict:
    import torch
    from ddpmseg.core.device import cpu_bf16_native

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_bf16_native(),
            "shared": "yes: 2 cores shared with other jobs; contenders interleaved"}


def render(result: dict) -> str:
    lines = []
    for s in result.get("accuracy", {}).get("sets", []):
        lines += [f"{s['set']} (mIoU %, soft vote, seeds {s['seeds']}):", "",
                  "| variant | precision | store | mIoU mean +- std | paired diff vs fp32 | "
                  "within seeds' spread |", "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            diff = (f"{r['paired_diff_mean']:+.2f} +- {r['paired_diff_std']:.2f}"
                    if "paired_diff_mean" in r else "-")
            within = {True: "yes", False: "no"}.get(r.get("within_seed_spread"), "-")
            lines.append(f"| {r['variant']} | {r['precision']} | {r['store_dtype']} | "
                         f"{r['miou_mean']:.2f} +- {r['miou_std']:.2f} | {diff} | {within} |")
        lines.append("")
    speed = result.get("speed", {}).get("runs", [])
    if speed:
        lines += ["| model | threads | fp32 s/image | bf16 s/image | bf16 speed-up (median) | "
                  "rel. error |", "|---|---|---|---|---|---|"]
        for r in speed:
            lines.append(f"| {r['model']} | {r['threads']} | {r['fp32_median_s']:.2f} | "
                         f"{r['bf16_median_s']:.2f} | {r['speedup_median']:.2f}x | "
                         f"{r['worst_relative_l2_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="both", choices=("accuracy", "speed", "both"))
    ap.add_argument("--sets", default="ffhq_34,celeba_19")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=None,
                    help="score on the first N test images only (default: all)")
    ap.add_argument("--seeds", default=None, help="classifier seeds (default 0,K,2K)")
    ap.add_argument("--speed-images", default="faces_64:4",
                    help="model:images timed per thread count (lsun_256 in bf16 is hours on a "
                         "CPU without native bf16: its convolutions are probed instead)")
    ap.add_argument("--lsun-probe", default="256:32",
                    help="channels:size of the lsun_256 convolutions probed, '' for none")
    ap.add_argument("--speed-threads", default="1,2")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--merge", default=None,
                    help="comma-separated JSON files of runs split by seed or variant: their "
                         "accuracy rows (and speed, where present) merged into --out")
    ap.add_argument("--scheduler", default=None,
                    help="extract's scheduler, e.g. local:4 (bf16 extraction is slow here)")
    ap.add_argument("--work", default="/tmp/ddpmseg_precision")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; use {', '.join(VARIANTS)}")
    K = args.members
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, K, 2 * K]

    import torch
    import logging
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["benchmark"] = "precision"
    result["machine"] = machine()
    if args.merge:
        result.update(merge_runs([Path(p) for p in args.merge.split(",")], args))
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(render(result))
        return 0
    if args.part in ("accuracy", "both"):
        torch.set_num_threads(1)

        def save(table: dict) -> None:
            # Re-read: another process may be running another set into the same file.
            current = json.loads(out.read_text()) if out.is_file() else result
            mine = {r["variant"] for r in table["rows"]}
            for other in current.get("accuracy", {}).get("sets", []):
                if other["set"] == table["set"]:  # keep rows that another run added since
                    extra = {r["variant"]: r for r in other["rows"] if r["variant"] not in mine}
                    if extra:
                        scores = {v: r["miou_per_seed"] for v, r in extra.items()}
                        scores.update({r["variant"]: r["miou_per_seed"] for r in table["rows"]})
                        secs = {v: {"extract_s": r["extract_s"], "fit_s": r["fit_s"]}
                                for v, r in {**extra, **{r["variant"]: r for r in
                                                         table["rows"]}}.items()}
                        table = paired_table(table["set"], args, table["num_classes"],
                                             scores, secs)
            acc = current.setdefault("accuracy", {})
            acc.update({
                "backbone": "bundled:faces_64 (faces64 config: steps 50,150,250, "
                            "blocks 2,4,5,7,8)", "image_size": 64, "members": K,
                "torch_threads": 1, "rule": "within seeds' spread: |mean paired diff| <= "
                                            "sample std of fp32 over seeds"})
            acc["sets"] = [s for s in acc.get("sets", []) if s["set"] != table["set"]] + [table]
            current["machine"] = result["machine"]
            result.update(current)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(current, indent=1, default=str) + "\n")

        for name in args.sets.split(","):
            if name:
                save(accuracy_one_set(name, args, save))
    if args.part in ("speed", "both"):
        result = json.loads(out.read_text()) if out.is_file() else result
        runs = []
        for spec in args.speed_images.split(","):
            name, n = spec.split(":")
            for threads in (int(t) for t in args.speed_threads.split(",")):
                runs.append(time_model(name, int(n), threads))
        for spec in filter(None, args.lsun_probe.split(",")):
            channels, size = (int(v) for v in spec.split(":"))
            for threads in (int(t) for t in args.speed_threads.split(",")):
                runs.append(conv_probe(channels, size, threads))
        result["speed"] = {"what": "Backbone.activations, one image per call, fp32 and bf16 "
                                   "interleaved (order flips each image)", "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(render(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

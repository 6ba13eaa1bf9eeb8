"""Lossy store codecs: bytes per image and mIoU against the lossless float16 store.

For each set (default ffhq_34 and celeba_19, the bundled faces64 backbone at 64 px, images
bilinear and masks nearest, as bench/ablation.py runs them): the train and test images are
extracted once into lossless float16 stores; each lossy codec's stores are then written from
those through the store's own encoder (``FeatureStore.write_image``, exactly what
``extract --codec bitroundK`` writes: the float16 value rounded to K mantissa bits). Reported:

- activation bytes on disk per image, and that as a fraction of the reference's dense float32
  features (feature_dim x H x W x 4 bytes per image);
- the largest relative error of a stored value against the lossless store;
- test mIoU (reference definition, percent) of the default method (ETF shared, soft vote),
  K members, for each classifier seed (default 0, 3, 6: disjoint members), trained and
  predicted on that codec's stores; and the mean paired difference against lossless.

Fits use ``in_memory=True`` (bit-identical members to streaming, and faster on this machine).

    python bench/store_lossy.py [--sets ffhq_34,celeba_19] [--codecs bitround2,bitround3,...]
                                [--miou-codecs bitround3] [--seeds 0,3,6] [--members 3]

Writes bench/results/store_lossy.json and .md and prints the table.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ablation.py

RESULTS = Path(__file__).resolve().parent / "results"


def act_bytes(path: Path) -> int:
    """Bytes on disk of a store's activation arrays (metadata included)."""
    return sum(f.stat().st_size for d in path.glob("act_t*") for f in d.rglob("*") if f.is_file())


def recode(src, dst: Path, codec: str) -> tuple[object, float]:
    """A copy of store ``src`` written with ``codec``; returns it and the largest relative
    error of a stored value against ``src``."""
    import dataclasses

    from ddpmseg.featcache import FeatureStore
    from ddpmseg.featcache.store import parse_codec

    info = dataclasses.replace(src.info, codec=parse_codec(codec, src.info.dtype))
    if dst.exists():
        shutil.rmtree(dst)
    out = FeatureStore.create(dst, info, config=src.config)
    worst = 0.0
    for i in range(len(src)):
        maps = src.maps(i)
        out.write_image(i, maps, src.labels(i) if info.has_labels else None)
        for a, b in zip(maps, out.maps(i)):
            a = a.astype(np.float32)
            nz = np.abs(a) >= np.finfo(np.float16).tiny   # normal float16 values
            if nz.any():
                worst = max(worst, float((np.abs(b.astype(np.float32) - a)[nz]
                                          / np.abs(a[nz])).max()))
    return FeatureStore.open(dst), worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="ffhq_34,celeba_19")
    ap.add_argument("--codecs", default="bitround1,bitround2,bitround3,bitround4",
                    help="lossy codecs whose size is measured")
    ap.add_argument("--miou-codecs", default="bitround2,bitround3",
                    help="the codecs also scored by mIoU (lossless always is)")
    ap.add_argument("--seeds", default="0,3,6")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--work", default="/tmp/ddpmseg_lossy")
    ap.add_argument("--out", default=str(RESULTS / "store_lossy"))
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from ablation import DATA_ROOT, build_config, write_ground_truth
    from ddpmseg.classifier import fit
    from ddpmseg.outputs.evaluate import evaluate
    from ddpmseg.pipelines.extract import extract
    from ddpmseg.pipelines.predict import predict

    seeds = [int(s) for s in args.seeds.split(",")]
    codecs = [c for c in args.codecs.split(",") if c]
    scored = ["lossless"] + [c for c in args.miou_codecs.split(",") if c]
    results = {}
    t_all = time.perf_counter()
    for set_name in args.sets.split(","):
        ns = argparse.Namespace(set=set_name, config=None, checkpoint=None, preset=None,
                                members=args.members)
        cfg = build_config(ns)
        dc = cfg.data
        data = Path(args.data_root or DATA_ROOT) / set_name / "real"
        work = Path(args.work) / set_name
        work.mkdir(parents=True, exist_ok=True)
        stores = {"lossless": {}}
        for split in ("train", "test"):
            stores["lossless"][split] = extract(data / split, work / f"lossless_{split}.zarr",
                                                cfg, device="cpu", resize=True, progress=False)
        info = stores["lossless"]["train"].info
        size = tuple(info.image_size)
        gt_dir = work / f"gt_{size[0]}x{size[1]}"
        write_ground_truth(data / "test", gt_dir, size, True)
        dense = info.feature_dim * size[0] * size[1] * 4
        rows = {}
        n_train = len(stores["lossless"]["train"])
        for codec in ["lossless"] + codecs:
            err = 0.0
            if codec != "lossless":
                stores[codec] = {}
                for split in ("train", "test"):
                    stores[codec][split], e = recode(stores["lossless"][split],
                                                     work / f"{codec}_{split}.zarr", codec)
                    err = max(err, e)
            per_image = act_bytes(Path(stores[codec]["train"].path)) / n_train
            rows[codec] = {"bytes_per_image": per_image, "fraction_of_dense": per_image / dense,
                           "max_rel_error": err}
            print(f"{set_name} {codec}: {per_image / 1e3:.1f} kB/image, 1/{dense / per_image:.0f}"
                  f" of dense float32, max rel error {err:.3g}", flush=True)
        # Seed-major: every seed's codecs run back to back, so partial results stay paired.
        for codec in scored:
            rows[codec]["miou_per_seed"] = []
        for seed in seeds:
            for codec in scored:
                c = cfg.replace(classifier={"seed": seed, "ensemble": args.members})
                run = work / "runs" / f"{codec}_s{seed}"
                pred = work / "preds" / f"{codec}_s{seed}"
                shutil.rmtree(pred, ignore_errors=True)
                t0 = time.perf_counter()
                fit(stores[codec]["train"], run, c, device="cpu", in_memory=True, resume=False,
                    progress=False)
                predict(run, stores[codec]["test"].path, pred, vote="soft", device="cpu",
                        progress=False, at_model_size=True)  # the 64 px masks
                r = evaluate(pred, gt_dir, num_classes=dc.num_classes,
                             ignore_label=dc.ignore_label, class_names=dc.class_names,
                             write=False)
                rows[codec]["miou_per_seed"].append(100.0 * r["miou"])
                print(f"  {set_name} {codec} seed {seed}: mIoU {100.0 * r['miou']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for codec in scored:
            miou = rows[codec]["miou_per_seed"]
            rows[codec]["miou_mean"] = statistics.fmean(miou)
            rows[codec]["miou_std"] = statistics.stdev(miou) if len(miou) > 1 else 0.0
        base = rows["lossless"]["miou_per_seed"]
        for codec in scored[1:]:
            rows[codec]["miou_paired_diff"] = statistics.fmean(
                a - b for a, b in zip(rows[codec]["miou_per_seed"], base))
        results[set_name] = {"feature_dim": info.feature_dim, "image_size": list(size),
                             "dense_float32_bytes_per_image": dense, "train_images": n_train,
                             "test_images": len(stores["lossless"]["test"]), "codecs": rows}

    setup = {"backbone": "bundled faces64 (adm_faces64_fp16.pt), 64 px, --resize",
             "dtype": "float16", "method": "ETF shared, soft vote", "members": args.members,
             "seeds": seeds, "fit": "in_memory", "torch_threads": args.threads,
             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
             "total_s": round(time.perf_counter() - t_all, 1)}
    md = render(results, setup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"benchmark": "store_lossy", "setup": setup,
                                               "results": results}, indent=1) + "\n")
    Path(f"{out}.md").write_text(md)
    print(md)
    print(f"wrote {out}.json and {out}.md")
    return 0


def render(results: dict, setup: dict) -> str:
    lines = [f"Lossy store codecs ({setup['backbone']}, {setup['dtype']}; mIoU: "
             f"{setup['method']}, {setup['members']} members, seeds {setup['seeds']})", "",
             "| set | codec | kB/image | of dense float32 | max rel. error | mIoU mean +- std "
             "| vs lossless (paired) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for codec, row in r["codecs"].items():
            miou = (f"{row['miou_mean']:.2f} +- {row['miou_std']:.2f}"
                    if "miou_mean" in row else "-")
            diff = (f"{row['miou_paired_diff']:+.2f}" if "miou_paired_diff" in row else "-")
            lines.append(f"| {name} | {codec} | {row['bytes_per_image'] / 1e3:.1f} | "
                         f"1/{1 / row['fraction_of_dense']:.0f} | {row['max_rel_error']:.3g} | "
                         f"{miou} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

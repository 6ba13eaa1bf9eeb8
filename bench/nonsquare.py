"""Non-square images three ways: stretch, pad (letterbox) and tiles, scored at the ORIGINAL size.

A non-square set made from real data: the centre 3:2 crop (W:H) of each 256x256 image and mask
of ../shared/data/<set>/real/{train,test}, cropped identically (256x170), then brought to
--width x --height (default 96x64: images bilinear, masks nearest) so that a run stays within
minutes on a shared 2-core CPU. The bundled backbone (bundled:faces_64, 64x64) is fitted to the
images each way (``resize=stretch|pad|tiles``, at extract and at predict); predictions come out
at the images' own size and are scored against the cropped masks at that size (reference mIoU).
Seeds: classifier seeds 0, K, 2K (K members each; disjoint member seeds), the same for every
mode. A short classifier schedule (--epochs) keeps the 3 x seeds fits per set affordable;
the numbers compare the modes, they are not the best each can reach.

    python bench/nonsquare.py [--sets ffhq_34,ade_bedroom_30] [--train 20] [--test 20]
                              [--members 3] [--epochs 1] [--width 96] [--height 64]

Writes bench/results/nonsquare.json and prints the table (mean +- sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
MODES = ("stretch", "pad", "tiles")


def crop_set(src: Path, dest: Path, limit: int, hw: tuple[int, int]) -> int:
    """The centre 3:2 crops of the first ``limit`` images (and masks) of ``src``, at ``hw``."""
    dest.mkdir(parents=True, exist_ok=True)
    images = sorted(src.glob("*.png"))[:limit]
    for path in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        mask = np.load(path.with_suffix(".npy"))
        side = image.shape[1]
        height = round(side * 2 / 3)  # 256 -> 170
        top = (image.shape[0] - height) // 2
        image, mask = image[top:top + height], mask[top:top + height]
        Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR).save(dest / path.name)
        small = Image.fromarray(mask.astype(np.uint8)).resize((hw[1], hw[0]), Image.NEAREST)
        np.save(dest / f"{path.stem}.npy", np.asarray(small))
    return len(images)


def config_for(name: str, members: int, epochs: int):
    import dataclasses

    from ddpmseg import load_config

    base = load_config("faces64_ffhq_34")
    if name != "ffhq_34":
        base = dataclasses.replace(base, data=load_config(name).data)
    return base.replace(classifier={"ensemble": members, "max_epochs": epochs,
                                    "min_epochs": epochs})


def run_set(name: str, args, work: Path) -> dict:
    from ddpmseg import evaluate, extract, fit, predict

    hw = (args.height, args.width)
    data = {}
    for split, limit in (("train", args.train), ("test", args.test)):
        data[split] = work / name / f"data_{split}"
        if data[split].exists():
            shutil.rmtree(data[split])
        crop_set(DATA_ROOT / name / "real" / split, data[split], limit, hw)
    cfg = config_for(name, args.members, args.epochs)
    dc = cfg.data
    seeds = [k * args.members for k in range(args.seeds)]
    out = {"modes": {}}
    for mode in MODES:
        t0 = time.perf_counter()
        store = work / name / f"{mode}_train.zarr"
        extract(data["train"], store, cfg, resize=mode, overwrite=True, progress=False)
        extract_s = time.perf_counter() - t0
        scores, fit_s, predict_s = [], [], []
        for seed in seeds:
            run = work / name / f"run_{mode}_s{seed}"
            t0 = time.perf_counter()
            fit(store, run, cfg.replace(classifier={"seed": seed}), resume=False,
                overwrite=True, progress=False)
            fit_s.append(time.perf_counter() - t0)
            pred = work / name / f"pred_{mode}_s{seed}"
            t0 = time.perf_counter()
            predict(run, data["test"], pred, resize=mode, progress=False)
            predict_s.append(time.perf_counter() - t0)
            r = evaluate(pred, data["test"], num_classes=dc.num_classes,
                         ignore_label=dc.ignore_label, write=False)
            scores.append(100.0 * r["miou"])
            print(f"{name} {mode:<7} seed {seed}: mIoU {scores[-1]:.2f} "
                  f"(fit {fit_s[-1]:.0f} s, predict {predict_s[-1]:.0f} s)", flush=True)
        out["modes"][mode] = {
            "miou": scores, "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "extract_train_s": round(extract_s, 1),
            "fit_s_mean": round(statistics.mean(fit_s), 1),
            "predict_test_s_mean": round(statistics.mean(predict_s), 1)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="ffhq_34,ade_bedroom_30")
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/ddpmseg-nonsquare")
    parser.add_argument("--out", default=str(RESULTS / "nonsquare.json"),
                        help="JSON to write; sets already in it are kept (each set records "
                             "its own settings)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    result = {
        "benchmark": "nonsquare",
        "setup": {"backbone": "bundled:faces_64 (64x64)", "images": f"centre 3:2 crops "
                  f"(256x170) of the real images and masks, brought to {args.width}x"
                  f"{args.height} (images bilinear, masks nearest)",
                  "train_images": args.train, "test_images": args.test,
                  "members": args.members, "epochs": args.epochs,
                  "seeds": [k * args.members for k in range(args.seeds)],
                  "miou": "reference definition, percent, at the images' own size",
                  "tiles": "64x64 windows at the image's resolution, stride 48, overlaps "
                           "averaged",
                  "threads": args.threads, "device": "cpu",
                  "machine": f"{platform.machine()}, shared 2-core CPU (other jobs running), "
                             f"Python {platform.python_version()}"},
        "sets": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        res = run_set(name, args, work)
        res["setup"] = dict(result["setup"])
        earlier = json.loads(out.read_text()).get("sets", {}) if out.is_file() else {}
        result["sets"] = {**earlier, **result["sets"], name: res}
        out.write_text(json.dumps(result, indent=1) + "\n")
    for name, res in result["sets"].items():
        for mode, r in res["modes"].items():
            print(f"{name:<16} {mode:<8} {r['mean']:6.2f} +- {r['std']:.2f}  "
                  f"(fit {r['fit_s_mean']} s, predict {r['predict_test_s_mean']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

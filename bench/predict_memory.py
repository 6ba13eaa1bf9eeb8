"""Peak RAM and speed of `predict` (row tiles) against the dense way, at the LSUN-256 layout.

Layout: steps 50, 150, 250 x blocks 5, 6, 7, 8, 12 of the 256px ADM UNet, native shapes per step
(1024,32,32) (512,32,32) (512,32,32) (512,64,64) (256,128,128): 8448 dims per pixel, 256x256
images. A feature store of synthetic float16 maps is written under /tmp with
FeatureStore.create/write_image. Ensembles of K = 1 and K = 10 random MLPs (8448->128->32->C,
ReLU + BatchNorm as the reference's pixel classifier) then predict every image of it, each
configuration in its own child process so that peak RSS (ru_maxrss) is that configuration's:

- tiled: ``ddpmseg.pipelines.predict.predict`` (tile_rows rows at a time, all outputs written);
- dense: the reference's way: every map upsampled to 256x256 float32 and concatenated
  (a 256x256x8448 tensor, 2.2 GB), then every member on all 65536 pixels, then the vote.

Goal: tiled peak RSS < 2 GB per 256px image at 8448 dims, whatever K.
Prints a table and writes bench/results/predict_memory.json.

    python bench/predict_memory.py [--images 3] [--ks 1,10] [--tile-rows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lsun_layout import BLOCKS, FEATURE_DIM, PER_STEP, SIZE, STEPS  # noqa: E402

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 34


def rss_gb() -> float:
    """Current resident set size, GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KB on Linux


def build_members(k: int, dim: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    members = []
    for _ in range(k):
        m = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.BatchNorm1d(128),
                          nn.Linear(128, 32), nn.ReLU(), nn.BatchNorm1d(32),
                          nn.Linear(32, NUM_CLASSES))
        for layer in m:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 0.02)
                nn.init.zeros_(layer.bias)
        members.append(m.eval())
    return members


def make_store(path: Path, n: int) -> None:
    import numpy as np

    from ddpmseg.spec import BackboneId
    from ddpmseg.spec import FeatureSpec
    from ddpmseg.featcache.store import FeatureStore, StoreInfo

    shapes = PER_STEP * len(STEPS)
    spec = FeatureSpec(steps=STEPS, blocks=BLOCKS, shapes=shapes, image_size=SIZE,
                       dtype="float16", backbone=BackboneId("synthetic", {"preset": "lsun_256"}))
    info = StoreInfo(spec, num_images=n, names=tuple(f"bench{i:03d}" for i in range(n)),
                     num_classes=NUM_CLASSES, ignore_label=255, has_labels=False)
    store = FeatureStore.create(path, info, overwrite=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        maps = [rng.standard_normal(s, dtype=np.float32).astype(np.float16) for s in shapes]
        store.write_image(i, maps)


# -- children -----------------------------------------------------------------------------
def child_tiled(store_path: str, k: int, tile_rows: int, out_dir: str) -> dict:
    from ddpmseg.config import Config
    from ddpmseg.featcache.store import FeatureStore
    from ddpmseg.classifier import Ensemble
    from ddpmseg.pipelines.predict import predict

    info = FeatureStore.open(store_path).info
    model = Ensemble(build_members(k, info.feature_dim), info, Config())
    base = rss_gb()
    t0 = time.perf_counter()
    res = predict(model, store_path, out_dir, tile_rows=tile_rows, device="cpu",
                  progress=False)
    seconds = time.perf_counter() - t0
    return {"images": res["num_images"], "seconds": seconds, "rss_before_gb": base,
            "peak_rss_gb": peak_rss_gb()}


def child_dense(store_path: str, k: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ddpmseg.featcache.store import FeatureStore
    from ddpmseg.outputs.voting import vote

    store = FeatureStore.open(store_path)
    members = build_members(k, store.info.feature_dim)
    base = rss_gb()
    t0 = time.perf_counter()
    for i in range(len(store)):
        maps = store.maps(i)
        with torch.no_grad():
            # The reference's collect_features: upsample every map, concatenate: (D, H, W).
            dense = torch.cat([F.interpolate(torch.from_numpy(m)[None].float(), size=SIZE,
                                             mode="bilinear", align_corners=False)[0]
                               for m in maps])
            feats = dense.view(dense.shape[0], -1).T  # (H*W, D), as predict_labels takes it
            logits = torch.stack([m(feats) for m in members])
            labels = vote(logits, "soft").view(*SIZE).to(torch.uint8).numpy()
        del dense, feats, logits
        np.save(Path(store_path).parent / f"dense_{i}.npy", labels)
    seconds = time.perf_counter() - t0
    return {"images": len(store), "seconds": seconds, "rss_before_gb": base,
            "peak_rss_gb": peak_rss_gb()}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--ks", default="1,10")
    parser.add_argument("--tile-rows", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/ddpmseg_bench_predict")
    parser.add_argument("--out", default=str(HERE / "results" / "predict_memory.json"))
    parser.add_argument("--keep", action="store_true", help="keep the store under --workdir")
    parser.add_argument("--child", choices=["tiled", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    work = Path(args.workdir)
    store = work / "store.zarr"
    if args.child == "tiled":
        print(json.dumps(child_tiled(str(store), args.k, args.tile_rows,
                                     str(work / f"out_k{args.k}"))))
        return
    if args.child == "dense":
        print(json.dumps(child_dense(str(store), args.k)))
        return

    import torch

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_store(store, args.images)
    print(f"store: {args.images} synthetic {SIZE[0]}x{SIZE[1]} images, {FEATURE_DIM} dims, float16, "
          f"{time.perf_counter() - t0:.1f} s to write", flush=True)
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for k in ks:
        for mode in ("tiled", "dense"):
            res = run_child(["--child", mode, "--k", str(k), "--workdir", str(work),
                             "--tile-rows", str(args.tile_rows)])
            res.update(mode=mode, k=k, images_per_s=res["images"] / res["seconds"])
            rows.append(res)
            print(f"K={k:>2} {mode:>5}: peak RSS {res['peak_rss_gb']:.2f} GB "
                  f"(before predicting {res['rss_before_gb']:.2f} GB), "
                  f"{res['images_per_s']:.3f} images/s", flush=True)

    print()
    print(f"{'K':>3}  {'tiled peak GB':>13}  {'dense peak GB':>13}  {'ratio':>6}  "
          f"{'tiled img/s':>11}  {'dense img/s':>11}")
    summary = []
    for k in ks:
        t = next(r for r in rows if r["k"] == k and r["mode"] == "tiled")
        d = next(r for r in rows if r["k"] == k and r["mode"] == "dense")
        ratio = d["peak_rss_gb"] / t["peak_rss_gb"]
        print(f"{k:>3}  {t['peak_rss_gb']:>13.2f}  {d['peak_rss_gb']:>13.2f}  {ratio:>5.1f}x  "
              f"{t['images_per_s']:>11.3f}  {d['images_per_s']:>11.3f}")
        summary.append({"k": k, "tiled_peak_rss_gb": t["peak_rss_gb"],
                        "dense_peak_rss_gb": d["peak_rss_gb"], "rss_ratio": ratio,
                        "tiled_images_per_s": t["images_per_s"],
                        "dense_images_per_s": d["images_per_s"],
                        "goal_tiled_below_2gb": t["peak_rss_gb"] < 2.0})
    result = {
        "benchmark": "predict_memory",
        "layout": {"steps": STEPS, "blocks": BLOCKS, "shapes_per_step": PER_STEP,
                   "image_size": SIZE, "feature_dim": FEATURE_DIM, "store_dtype": "float16",
                   "num_classes": NUM_CLASSES, "member": "8448->128->32->34 MLP (BN)"},
        "images": args.images,
        "tile_rows": args.tile_rows,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "device": "cpu",
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": "peak RSS = ru_maxrss of a child process that loads the members and predicts "
                 "every image (includes Python, torch and the members); tiled = "
                 "ddpmseg.pipelines.predict.predict writing all outputs; dense = reference-style "
                 "full 256x256x8448 float32 features, members, soft vote, .npy only",
        "runs": rows,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

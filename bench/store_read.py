"""Read speed of fit's access pattern, store format 3 (shards) against format 2 (a file per image).

fit's sampler (classifier/sampler.py) loads whole images' maps (``store.maps(i)``, plus
``store.labels(i)``) in a random order, then draws pixels from them. Two stores of the same N
images (faces64's layout: steps 50,150,250, blocks 2,4,5,7,8 at 64 px, 1344 dims; random
float16 maps, which compress as little as real activations do) are written, one per format;
then rounds of "every image once, in a random order" are timed, alternating the formats
(2, 3, 2, 3...), each round in a fresh process-level handle (``FeatureStore.open``).

One thread; the page cache is warm after the first round (both stores fit in memory), so this
measures ddpmseg's and zarr's per-read overhead, not the disk. Writes
bench/results/store_read.json.

    python bench/store_read.py [--images 256] [--rounds 5] [--images-per-shard 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpmseg.featcache import FeatureStore, StoreInfo  # noqa: E402
from ddpmseg.spec import BackboneId, FeatureSpec  # noqa: E402

STEPS, BLOCKS = (50, 150, 250), (2, 4, 5, 7, 8)
BLOCK_SHAPES = {2: (256, 8, 8), 4: (256, 16, 16), 5: (256, 16, 16), 7: (128, 32, 32),
                8: (128, 32, 32)}


def make_store(path: Path, n: int, per_shard: int) -> None:
    shapes = tuple(BLOCK_SHAPES[b] for _ in STEPS for b in BLOCKS)
    spec = FeatureSpec(steps=STEPS, blocks=BLOCKS, shapes=shapes, image_size=(64, 64),
                       dtype="float16", backbone=BackboneId("ef" * 32, {"image_size": 64}))
    info = StoreInfo(spec, num_images=n, names=tuple(f"im{k:05d}" for k in range(n)),
                     num_classes=34, ignore_label=255, images_per_shard=per_shard,
                     format_version=3 if per_shard else 2)
    store = FeatureStore.create(path, info)
    store.plan_writes(range(n))
    rng = np.random.default_rng(0)
    for i in range(n):
        maps = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
        store.write_image(i, maps, rng.integers(0, 34, (64, 64), dtype=np.uint8))
    store.flush()


def one_round(path: Path, order: np.ndarray) -> float:
    t = time.perf_counter()
    store = FeatureStore.open(path)
    for i in order:
        store.maps(int(i))
        store.labels(int(i))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_read.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {2: Path(tmp) / "f2.zarr", 3: Path(tmp) / "f3.zarr"}
        make_store(paths[2], args.images, 0)
        make_store(paths[3], args.images, args.images_per_shard)
        files = {f: sum(1 for p in paths[f].rglob("*") if p.is_file()) for f in paths}
        size = {f: sum(p.stat().st_size for p in paths[f].rglob("*") if p.is_file())
                for f in paths}
        times = {2: [], 3: []}
        for _ in range(args.rounds + 1):   # the first round warms the page cache: dropped
            order = rng.permutation(args.images)
            for f in (2, 3):
                times[f].append(one_round(paths[f], order))
    ms = {f: [1000 * t / args.images for t in times[f][1:]] for f in times}
    result = {
        "images": args.images, "images_per_shard": args.images_per_shard,
        "ms_per_image_format2": [round(x, 2) for x in ms[2]],
        "ms_per_image_format3": [round(x, 2) for x in ms[3]],
        "median_ms_format2": round(statistics.median(ms[2]), 2),
        "median_ms_format3": round(statistics.median(ms[3]), 2),
        "min_ms_format2": round(min(ms[2]), 2), "min_ms_format3": round(min(ms[3]), 2),
        "format3_over_format2_median": round(statistics.median(ms[3])
                                             / statistics.median(ms[2]), 3),
        "files": files, "bytes": size,
        "what": "maps(i) + labels(i) of every image once, random order, fresh handle per round "
                "(fit's sampler reads whole images); faces64 layout, 1344 dims, float16",
        "threads": 1, "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with "
                                   "other jobs (timings noisy); warm page cache",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A no-op re-extract of a large folder: stat before hash against hashing every file.

A synthetic folder of N tiny 32x32 PNGs (and, with ``--masks``, their .npy masks) is extracted
once into a store with a fake backbone (tests/featcache/conftest.py's FakeBackbone: cheap,
deterministic maps; the model is not what is measured). Then ``extract`` is rerun on the
unchanged folder, the library call timed as a whole (the backbone already loaded), alternating
the two contenders:

- stat: this ddpmseg (content.StatCache: only files whose stat changed are hashed);
- hash: the same code with an empty stat cache each time, so every file is hashed (what
  extract did before).

Goal: N = 10,000 with nothing changed re-extracts in < 5 s. One torch thread; min and median
of the repeats; writes bench/results/reextract_noop.json.

    python bench/reextract_noop.py [--images 10000] [--repeats 3] [--masks]
"""

from __future__ import annotations

import argparse
import importlib.util
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpmseg.config import Config  # noqa: E402
from ddpmseg.featcache import content  # noqa: E402
from ddpmseg.pipelines.extract import extract  # noqa: E402


def fake_backbone():
    spec = importlib.util.spec_from_file_location(
        "fc_conftest", REPO / "tests" / "featcache" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeBackbone()


def make_folder(folder: Path, n: int, masks: bool) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"img{k:05d}.png")
        if masks:
            np.save(folder / f"img{k:05d}.npy", rng.integers(0, 3, (32, 32), dtype=np.uint8))


def timed(folder: Path, store: Path, cfg: Config, bb, hash_all: bool) -> float:
    load = content.StatCache.load
    if hash_all:  # an empty cache that is never saved: every file is hashed
        content.StatCache.load = classmethod(lambda cls, path: cls(None, {}))
    try:
        t = time.perf_counter()
        extract(folder, store, cfg, backbone=bb, progress=False)
        return time.perf_counter() - t
    finally:
        content.StatCache.load = load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--masks", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reextract_noop.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = fake_backbone()
    cfg = Config().replace(data={"num_classes": 3, "ignore_label": 255},
                           features={"steps": (5,), "blocks": (1,), "images_per_batch": 64})
    with tempfile.TemporaryDirectory() as tmp:
        folder, store = Path(tmp) / "data", Path(tmp) / "s.zarr"
        make_folder(folder, args.images, args.masks)
        t0 = time.perf_counter()
        extract(folder, store, cfg, backbone=bb, progress=False)
        first = time.perf_counter() - t0
        time.sleep(2.5)  # past content.RACY_NS: the files are no longer racily clean
        timed(folder, store, cfg, bb, False)  # records the stats once
        times = {"stat": [], "hash": []}
        for _ in range(args.repeats):
            for name in ("stat", "hash"):
                times[name].append(timed(folder, store, cfg, bb, name == "hash"))
        files = sum(1 for p in store.rglob("*") if p.is_file())
    result = {
        "images": args.images, "masks": args.masks, "first_extract_s": round(first, 2),
        "noop_stat_s": [round(t, 3) for t in times["stat"]],
        "noop_hash_s": [round(t, 3) for t in times["hash"]],
        "stat_min_s": round(min(times["stat"]), 3),
        "stat_median_s": round(statistics.median(times["stat"]), 3),
        "hash_min_s": round(min(times["hash"]), 3),
        "hash_median_s": round(statistics.median(times["hash"]), 3),
        "speedup_median": round(statistics.median(times["hash"])
                                / statistics.median(times["stat"]), 2),
        "store_files": files, "goal": "< 5 s for 10,000 unchanged images",
        "threads": 1, "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with "
                                   "other jobs (timings noisy)",
        "how": "library extract() call on an unchanged folder, backbone loaded; contenders "
               "interleaved stat, hash, stat, hash...",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What appending one image to a store costs in its metadata: bytes rewritten and time.

A store of N images (tiny maps; format 3) with every image's name and hashes recorded is made;
then one image is appended the way ``extract`` follows a folder that gained it
(``content.plan`` + ``content.apply``: arrays grown, names and hashes recorded), and its own
chunks written. Counted: bytes zarr's LocalStore wrote (``LocalStore.set``), split into the
group's zarr.json (the attributes: names, hashes, digest) and the rest; and the time of the
metadata step (plan + apply), min of repeats. For N = 300 and 3000: O(1) would be the same
bytes for both. Writes bench/results/store_append.json.

Format 3 (names and hashes in the group attributes) against format 4 (in the image_records
array; ``StoreInfo(format_version=4)``, FORMAT.md "Per-image records"), the same append on
stores of the same images, interleaved repeat by repeat. Format 4's bytes are split into the
records chunk (and its zarr.json) and the rest.

    python bench/store_append.py [--sizes 300,3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zarr.storage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpmseg.featcache import FeatureStore, StoreInfo, content  # noqa: E402
from ddpmseg.spec import BackboneId, FeatureSpec  # noqa: E402

SHAPES = ((4, 2, 2),)
WRITTEN: Counter = Counter()


def count_writes() -> None:
    real = zarr.storage.LocalStore.set

    async def counting(self, key, value):
        WRITTEN["zarr.json" if key == "zarr.json" else
                "records" if key.startswith("image_records/") else "other"] += len(value)
        return await real(self, key, value)

    zarr.storage.LocalStore.set = counting


def fake_hashes(names) -> dict:
    return {n: [hashlib.sha256(n.encode()).hexdigest(),
                hashlib.sha256(b"m" + n.encode()).hexdigest()] for n in names}


def make(path: Path, n: int, version: int) -> FeatureStore:
    spec = FeatureSpec(steps=(10,), blocks=(1,), shapes=SHAPES, image_size=(4, 4),
                       dtype="float16", backbone=BackboneId("ab" * 32, {"image_size": 4}))
    names = tuple(f"img{k:06d}" for k in range(n))
    info = StoreInfo(spec, num_images=n, names=names, num_classes=3, ignore_label=255,
                     format_version=version)
    store = FeatureStore.create(path, info)
    store.plan_writes(range(n))
    for i in range(n):
        store.write_image(i, [torch.zeros(SHAPES[0])], np.zeros((4, 4), np.uint8))
    store.flush()
    content.write_state(store, info, content.ImageState(fake_hashes(names)))
    return FeatureStore.open(path, mode="r+")


def append_one(store: FeatureStore) -> tuple[float, Counter]:
    names = list(store.names)
    new = f"img{len(names):06d}"
    folder = fake_hashes(names + [new])
    WRITTEN.clear()
    t = time.perf_counter()
    plan = content.plan(store, folder, prune=False)
    content.apply(store, plan, {})
    elapsed = time.perf_counter() - t
    meta = Counter(WRITTEN)
    store.write_image(len(names), [torch.zeros(SHAPES[0])], np.zeros((4, 4), np.uint8))
    return elapsed, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="300,3000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_append.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    count_writes()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            stores = {v: make(Path(tmp) / f"s{n}_v{v}.zarr", n, v) for v in (3, 4)}
            times = {3: [], 4: []}
            metas = {3: [], 4: []}
            for _ in range(args.repeats):   # interleaved: format 3, format 4, ...
                for v in (3, 4):
                    t, meta = append_one(stores[v])
                    times[v].append(t)
                    metas[v].append(meta)
            rows[n] = {"metadata_step_min_s": round(min(times[3]), 4),
                       "metadata_step_s": [round(t, 4) for t in times[3]],
                       "group_zarr_json_bytes_written": metas[3][-1]["zarr.json"],
                       "other_metadata_bytes_written": metas[3][-1]["other"],
                       "format4": {
                           "metadata_step_min_s": round(min(times[4]), 4),
                           "metadata_step_median_s": round(sorted(times[4])[len(times[4]) // 2],
                                                           4),
                           "metadata_step_s": [round(t, 4) for t in times[4]],
                           "group_zarr_json_bytes_written": metas[4][-1]["zarr.json"],
                           "image_records_bytes_written": metas[4][-1]["records"],
                           "other_metadata_bytes_written": metas[4][-1]["other"]}}
    result = {"stores": rows, "format": "3, and 4 under 'format4'",
              "what": "one image appended: content.plan + content.apply (arrays grown, names "
                      "and hashes recorded in the group attributes); bytes LocalStore wrote "
                      "in that step; 'format4': the same append to a format 4 store (names "
                      "and state in the image_records array), interleaved",
              "threads": 1, "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared "
                                       "with other jobs (timings noisy; bytes exact)"}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

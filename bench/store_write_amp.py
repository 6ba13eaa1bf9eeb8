"""Write amplification of store format 3: bytes written to storage / bytes the store ends with.

Every byte zarr's LocalStore writes (``LocalStore.set``, metadata included) is counted while a
store of N images is written (FeatureStore's own write path: ``plan_writes`` then
``write_image``, as ``extract`` does), in three ways:

- ``whole``: all N images in one run (each shard written once);
- ``grow_K``: a store grown K images at a time (the last, partial shard rewritten each time it
  gains images: ``extract`` on a folder that gains K images per round);
- the same for format 2 (one file per image per array), the baseline: no rewrite at all.

Small maps (4 arrays of (32, 16, 16) float16, 64 px labels): the ratio does not depend on the
map size. Writes bench/results/store_write_amp.json.

    python bench/store_write_amp.py [--images 256] [--images-per-shard 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr.storage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpmseg.featcache import FeatureStore, StoreInfo  # noqa: E402
from ddpmseg.spec import BackboneId, FeatureSpec  # noqa: E402

SHAPES = ((32, 16, 16),) * 4
WRITTEN = [0]


def count_writes() -> None:
    real = zarr.storage.LocalStore.set

    async def counting(self, key, value):
        WRITTEN[0] += len(value)
        return await real(self, key, value)

    zarr.storage.LocalStore.set = counting


def info_of(n: int, per_shard: int) -> StoreInfo:
    spec = FeatureSpec(steps=(10, 20), blocks=(1, 2), shapes=SHAPES, image_size=(64, 64),
                       dtype="float16", backbone=BackboneId("ab" * 32, {"image_size": 64}))
    return StoreInfo(spec, num_images=n, names=tuple(f"im{k:05d}" for k in range(n)),
                     num_classes=34, ignore_label=255, images_per_shard=per_shard,
                     format_version=3 if per_shard else 2)


def write(store: FeatureStore, indices) -> None:
    store.plan_writes(list(indices))
    for i in indices:
        rng = np.random.default_rng(i)
        maps = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for s in SHAPES]
        store.write_image(i, maps, rng.integers(0, 34, (64, 64), dtype=np.uint8))
    store.flush()


def amplification(path: Path, n: int, per_shard: int, step: int) -> dict:
    WRITTEN[0] = 0
    store = FeatureStore.create(path, info_of(min(step, n), per_shard))
    write(store, range(min(step, n)))
    done = min(step, n)
    while done < n:
        grown = min(done + step, n)
        store.resize(grown)
        store.record(dataclasses.replace(info_of(grown, per_shard)), {})
        write(store, range(done, grown))
        done = grown
    final = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"written_bytes": WRITTEN[0], "store_bytes": final,
            "amplification": round(WRITTEN[0] / final, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--images-per-shard", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_write_amp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    count_writes()
    n, s = args.images, args.images_per_shard
    cases = {"whole": n, "grow_32": 32, "grow_8": 8, "grow_1": 1}
    result = {"images": n, "images_per_shard": s, "format3": {}, "format2": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in cases.items():
            for fmt, per in (("format3", s), ("format2", 0)):
                path = Path(tmp) / f"{fmt}_{name}.zarr"
                result[fmt][name] = amplification(path, n, per, step)
    result.update(
        threads=1, machine=f"{platform.machine()}, {os.cpu_count()} cores, shared with other "
                           "jobs (bytes are exact; no timing)",
        what="bytes LocalStore.set wrote (chunks, shards and metadata) / bytes of the final "
             "store; grow_K: the store grown K images per round, each round's images written "
             "as extract writes them")
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

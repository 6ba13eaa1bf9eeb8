"""What appending one image to a store costs in its metadata: bytes rewritten and time.

A store of N images (tiny maps; format 3) with every image's name and hashes recorded is made;
then one image is appended the way ``extract`` follows a folder that gained it
(``content.plan`` + ``content.apply``: arrays grown, names and hashes recorded), and its own
chunks written. Counted: bytes zarr's LocalStore wrote (``LocalStore.set``), split into the
group's zarr.json (the attributes: names, hashes, digest) and the rest; and the time of the
metadata step (plan + apply), min of repeats. For N = 300 and 3000: O(1) would be the same
bytes for both. Writes bench/results/store_append.json.

Beside it, interleaved repeat by repeat, the per-image records (``featcache.image_records``, not yet
switched on in stores) in a second group of N records: the same append done the way the
records design does it (FORMAT.md, "Per-image records"): the new record written (its chunk
and the records array's zarr.json), then the group attributes without names and image state
(the commit: the new count). The arrays' growth (the "other" bytes above, about 3.9 kB) is
the same in both and not repeated there.

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

import zarr  # noqa: E402

from ddpmseg.featcache import FeatureStore, StoreInfo, content, image_records  # noqa: E402
from ddpmseg.featcache.store import IMAGES_ATTR  # noqa: E402
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


def make(path: Path, n: int) -> FeatureStore:
    spec = FeatureSpec(steps=(10,), blocks=(1,), shapes=SHAPES, image_size=(4, 4),
                       dtype="float16", backbone=BackboneId("ab" * 32, {"image_size": 4}))
    names = tuple(f"img{k:06d}" for k in range(n))
    info = StoreInfo(spec, num_images=n, names=names, num_classes=3, ignore_label=255)
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


def make_records(path: Path, store: FeatureStore) -> zarr.Group:
    """A group holding ``store``'s names and hashes as records, and its attributes without
    them (what a store with records would hold)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    state = content.read_state(store)
    arr = image_records.create(group, 0, store.info.images_per_shard)
    image_records.write(arr, 0, image_records.from_images(store.names, state.to_json()))
    attrs = store.group.attrs.asdict()
    attrs.pop(IMAGES_ATTR, None)
    attrs["ddpmseg"] = {k: v for k, v in attrs["ddpmseg"].items() if k != "names"}
    group.attrs.update(attrs)
    return group


def append_record(group: zarr.Group) -> tuple[float, Counter]:
    arr = group[image_records.IMAGE_RECORDS]
    n = arr.shape[0]
    new = f"img{n:06d}"
    rec = image_records.ImageRecord(new, tuple(fake_hashes([new])[new]))
    WRITTEN.clear()
    t = time.perf_counter()
    image_records.write(arr, n, [rec])
    attrs = group.attrs.asdict()
    attrs["ddpmseg"] = {**attrs["ddpmseg"], "num_images": n + 1}
    group.attrs.update(attrs)
    return time.perf_counter() - t, Counter(WRITTEN)


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
            store = make(Path(tmp) / f"s{n}.zarr", n)
            group = make_records(Path(tmp) / f"r{n}.zarr", store)
            times, metas, rtimes, rmetas = [], [], [], []
            for _ in range(args.repeats):   # interleaved: attributes, records, ...
                t, meta = append_one(store)
                times.append(t)
                metas.append(meta)
                t, meta = append_record(group)
                rtimes.append(t)
                rmetas.append(meta)
            rows[n] = {"metadata_step_min_s": round(min(times), 4),
                       "metadata_step_s": [round(t, 4) for t in times],
                       "group_zarr_json_bytes_written": metas[-1]["zarr.json"],
                       "other_metadata_bytes_written": metas[-1]["other"],
                       "records": {
                           "step_min_s": round(min(rtimes), 4),
                           "step_median_s": round(sorted(rtimes)[len(rtimes) // 2], 4),
                           "step_s": [round(t, 4) for t in rtimes],
                           "group_zarr_json_bytes_written": rmetas[-1]["zarr.json"],
                           "records_bytes_written": rmetas[-1]["records"]}}
    result = {"stores": rows, "format": 3,
              "what": "one image appended: content.plan + content.apply (arrays grown, names "
                      "and hashes recorded in the group attributes); bytes LocalStore wrote "
                      "in that step; 'records': the same append with per-image records "
                      "(featcache.image_records, not yet switched on in stores), measured on a "
                      "second group holding the same records, interleaved",
              "threads": 1, "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared "
                                       "with other jobs (timings noisy; bytes exact)"}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

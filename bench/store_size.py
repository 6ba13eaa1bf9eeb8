"""Feature-store size versus the reference's dense float32 features, and write throughput.

The LSUN/FFHQ 256px architecture (random weights: sizes and speeds do not depend on the
weights' values, only compression ratios slightly), steps 50,150,250 and blocks 5,6,7,8,12
(8448 dims per pixel), a few real 256px images (bedroom_28 train; random images when
../shared is absent). The reference keeps, per image, every pixel's 8448 float32 features:
8448 x 256 x 256 x 4 bytes = 2.2 GB. Goal: the store is < 1/30 of that.

Reports bytes on disk (all files, and activation chunks only) against the dense float32 size,
the end-to-end extraction rate (images/s, model included), and the writer's own throughput
(MB/s of raw float32 activations cast, checked, compressed and written; one thread and the
extractor's thread pool). Prints a table and writes bench/results/store_size.json.

    python bench/store_size.py [--images 2] [--dtype float16] [--device cpu]
    python bench/store_size.py --model sd15 --blocks 1,2,3 --images 1

``--model sd15``: Stable Diffusion 1.x at full size (UNet + VAE, random weights, a random prompt
embedding in place of CLIP's; bench/sd_layout.py) on the same images upscaled to 512px: the
up_blocks maps of 64x64 latents against 6720 x 512 x 512 dense float32 values (7 GB) per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def make_data(dest: Path, n: int, size: int) -> str:
    """n images with masks in dest; returns a description of their source."""
    dest.mkdir(parents=True)
    folder = SHARED / "data" / "bedroom_28" / "real" / "train"
    paths = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if len(paths) == n:
        for p in paths:
            shutil.copy(p, dest / p.name)
            shutil.copy(p.with_suffix(".npy"), dest / f"{p.stem}.npy")
        return f"{n} bedroom_28 train images ({size}px)"
    rng = np.random.default_rng(0)
    for k in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(dest / f"r{k}.png")
        np.save(dest / f"r{k}.npy", rng.integers(0, 29, (size, size)).astype(np.uint8))
    return f"{n} random images ({size}px)"


class Recording:
    """A backbone wrapper that times the model and keeps the last activations."""

    def __init__(self, bb):
        self.bb, self.model_s, self.last = bb, 0.0, None

    def __getattr__(self, name):
        return getattr(self.bb, name)

    def activations(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.bb.activations(*args, **kwargs)
        self.model_s += time.perf_counter() - start
        self.last = out
        return out


def file_bytes(root: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and str(p.relative_to(root)).startswith(prefix))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", default="50,150,250")
    ap.add_argument("--blocks", default="5,6,7,8,12")
    ap.add_argument("--model", choices=("lsun_256", "sd15"), default="lsun_256",
                    help="ADM 256px, or Stable Diffusion 1.x at 512px (random weights)")
    ap.add_argument("--codecs", default="bitround2,bitround3,bitround4",
                    help="lossy codecs also measured, on the same images' maps")
    ap.add_argument("--out", default=None,
                    help="[default: bench/results/store_size.json, store_size_sd15.json]")
    args = ap.parse_args()
    suffix = "" if args.model == "lsun_256" else f"_{args.model}"
    args.out = args.out or str(REPO / "bench" / "results" / f"store_size{suffix}.json")

    from ddpmseg.backbone import Backbone
    from ddpmseg import load_config
    from ddpmseg.featcache import FeatureStore
    from ddpmseg.pipelines.extract import extract
    from ddpmseg.pipelines.extract import WRITER_THREADS
    from ddpmseg.featcache.store import array_name, parse_codec

    steps = tuple(int(v) for v in args.steps.split(","))
    blocks = tuple(int(v) for v in args.blocks.split(","))
    start = time.perf_counter()
    if args.model == "sd15":
        import sd_layout

        bb = Recording(sd_layout.random_backbone(seed=0, device=args.device))
    else:
        bb = Recording(Backbone.random("lsun_256", seed=0, device=args.device))
    load_s = time.perf_counter() - start
    size = bb.image_size
    cfg = load_config("bedroom_28").replace(
        model={"preset": "lsun_256"},
        features={"steps": steps, "blocks": blocks, "dtype": args.dtype})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = make_data(tmp / "data", args.images, 256)
        if size != 256:
            source += f", resized to {size}px"
        start = time.perf_counter()
        store = extract(tmp / "data", tmp / "store.zarr", cfg, backbone=bb, progress=True,
                        resize=size != 256)
        extract_s = time.perf_counter() - start
        info = store.info
        n, dim = len(store), info.feature_dim
        total = file_bytes(tmp / "store.zarr")
        acts = sum(file_bytes(tmp / "store.zarr", array_name(t, b)) for t, b in info.keys)
        labels = file_bytes(tmp / "store.zarr", "labels")
        dense = n * dim * size * size * 4
        native_f32 = n * sum(c * h * w for c, h, w in info.shapes) * 4
        native_dtype = native_f32 // (1 if args.dtype == "float32" else 2)

        # The writer alone: the last image's activations written N times into a fresh store,
        # by one thread and by the extractor's pool.
        maps = [bb.last[k][0] for k in info.keys]
        lab = store.labels(n - 1)
        writes = {}
        for threads in sorted({1, WRITER_THREADS}):
            target = FeatureStore.create(tmp / f"w{threads}.zarr", info)
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda i: target.write_image(i, maps, lab), range(n)))
            writes[threads] = time.perf_counter() - start
        read_start = time.perf_counter()
        for i in range(n):
            store.maps(i)
        read_s = time.perf_counter() - read_start

        # Lossy codecs: the same maps written again with each (what extract --codec writes:
        # rounding the stored dtype's values, so re-encoding the store's values is the same).
        lossy = {}
        for name in [c for c in args.codecs.split(",") if c]:
            linfo = dataclasses.replace(info, codec=parse_codec(name, info.dtype))
            target = FeatureStore.create(tmp / f"{name}.zarr", linfo)
            for i in range(n):
                target.write_image(i, store.maps(i), store.labels(i))
            b = sum(file_bytes(tmp / f"{name}.zarr", array_name(t, bl)) for t, bl in info.keys)
            lossy[name] = {"activation_chunk_bytes": b, "dense_over_store": dense / b,
                           "vs_lossless": b / acts}

    per_image_mb = native_f32 / n / 1e6
    result = {
        "architecture": f"{args.model} (random weights)", "images": source, "num_images": n,
        "steps": steps, "blocks": blocks, "feature_dim": dim, "dtype": args.dtype,
        "codec": info.codec, "device": str(bb.device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "model_load_s": load_s,
        "dense_float32_bytes": dense, "store_bytes": total, "activation_chunk_bytes": acts,
        "label_chunk_bytes": labels, "native_uncompressed_bytes": native_dtype,
        "store_over_dense": total / dense, "dense_over_store": dense / total,
        "codec_ratio": native_dtype / acts,
        "extract_s": extract_s, "model_s": bb.model_s,
        "extract_images_per_s": n / extract_s,
        "write_raw_float32_MBps": {str(k): native_f32 / v / 1e6 for k, v in writes.items()},
        "write_images_per_s": {str(k): n / v for k, v in writes.items()},
        "read_raw_MBps": native_dtype / read_s / 1e6,
        "lossy_codecs": lossy,
    }
    print(f"\n{args.model} architecture, {source}, steps {steps}, blocks {blocks}: {dim} dims, "
          f"{args.dtype}, codec {info.codec}, device {bb.device}")
    print(f"  dense float32 features (reference): {dense / 1e9:8.3f} GB  "
          f"({dense / n / 1e9:.2f} GB per image)")
    print(f"  store on disk:                      {total / 1e9:8.3f} GB  "
          f"({total / n / 1e6:.1f} MB per image; activations {acts / 1e6:.1f} MB, labels "
          f"{labels / 1e3:.1f} kB)")
    print(f"  store / dense = 1/{dense / total:.1f}   (goal: < 1/30)   "
          f"codec ratio over raw {args.dtype}: {native_dtype / acts:.2f}x")
    print(f"  extraction: {n / extract_s:.3f} images/s end to end ({extract_s:.1f}s; model "
          f"{bb.model_s:.1f}s)")
    for k, v in writes.items():
        print(f"  writer, {k} thread{'s' if k > 1 else ''}: {native_f32 / v / 1e6:7.0f} MB/s of "
              f"raw float32 activations ({per_image_mb:.0f} MB per image), {n / v:.2f} images/s")
    print(f"  reading maps back: {native_dtype / read_s / 1e6:.0f} MB/s")
    for name, r in lossy.items():
        print(f"  {name}: activations {r['activation_chunk_bytes'] / n / 1e6:.1f} MB per image, "
              f"1/{r['dense_over_store']:.0f} of dense float32 ({r['vs_lossless']:.2f} of "
              f"lossless)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

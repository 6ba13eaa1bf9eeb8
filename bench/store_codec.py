"""Which codec should the feature store use? Size and speed of each, on real activations.

Activations of the trained faces64 backbone (../shared/backbones/adm_faces64; the tiny fixture
model when it is absent) for a few real ffhq_34 training images resized to 64x64, at steps
50,150,250 and blocks 2,4,5,7,8, cast to the store's float16 (and bfloat16 for the chosen
codec). Each candidate writes them exactly as the store does (one zarr array per (step, block),
one image per chunk, crc32c after the codec) into a temporary directory.

Reports bytes on disk, ratio versus the raw float16 bytes, write MB/s and read MB/s (MB of raw
float16 per second, best of --repeat), prints a table and writes bench/results/store_codec.json.

    python bench/store_codec.py [--images 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STEPS = (50, 150, 250)


def load_backbone():
    from ddpmseg.backbone import Backbone

    faces = SHARED / "backbones" / "adm_faces64" / "adm_faces64.pt"
    if faces.is_file():
        return Backbone.from_checkpoint(faces, "faces_64"), (2, 4, 5, 7, 8), "adm_faces64"
    tiny = SHARED / "fixtures" / "adm" / "adm_tiny64_cosine.pt"
    return Backbone.from_checkpoint(tiny, "tiny64_cosine"), (2, 5, 8, 11), "adm_tiny64_cosine"


def load_images(n: int, size: int) -> tuple[torch.Tensor, str]:
    folder = SHARED / "data" / "ffhq_34" / "real" / "train"
    paths = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if not paths:
        gen = torch.Generator().manual_seed(0)
        return torch.rand(n, 3, size, size, generator=gen) * 2 - 1, "random noise images"
    xs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(xs), f"{len(paths)} ffhq_34 train images at {size}px"


def candidates() -> list[dict]:
    out = [{"cname": "none"}, {"cname": "zstd-plain", "clevel": 3}]
    for cname, levels in (("zstd", (1, 3, 5, 9)), ("lz4", (1, 5, 9))):
        for level in levels:
            for shuffle in ("noshuffle", "shuffle", "bitshuffle"):
                out.append({"cname": cname, "clevel": level, "shuffle": shuffle})
    return out


def codecs_for(c: dict) -> list:
    if c["cname"] == "none":
        return [Crc32cCodec()]
    if c["cname"] == "zstd-plain":  # zarr's plain Zstd codec, no Blosc, no shuffle
        return [ZstdCodec(level=c["clevel"]), Crc32cCodec()]
    return [BloscCodec(cname=c["cname"], clevel=c["clevel"], shuffle=BloscShuffle[c["shuffle"]]),
            Crc32cCodec()]


def label(c: dict) -> str:
    if c["cname"] == "none":
        return "none (crc32c only)"
    if c["cname"] == "zstd-plain":
        return f"zstd {c['clevel']} (plain)"
    return f"blosc {c['cname']} {c['clevel']} {c['shuffle']}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.parent != path
               and p.name != "zarr.json")


def measure(arrays: dict, codec: dict, root: Path, repeat: int, dtype) -> dict:
    raw = sum(a.nbytes for a in arrays.values())
    writes, reads = [], []
    size = 0
    for r in range(repeat):
        path = root / f"run{r}"
        group = zarr.create_group(store=str(path), zarr_format=3, overwrite=True)
        zarrs = {k: group.create_array(k, shape=a.shape, chunks=(1,) + a.shape[1:], dtype=dtype,
                                       compressors=codecs_for(codec), fill_value=0,
                                       config={"write_empty_chunks": True})
                 for k, a in arrays.items()}
        start = time.perf_counter()
        for i in range(next(iter(arrays.values())).shape[0]):
            for k, a in arrays.items():
                zarrs[k][i] = a[i]
        writes.append(time.perf_counter() - start)
        size = dir_bytes(path)
        start = time.perf_counter()
        for i in range(next(iter(arrays.values())).shape[0]):
            for k in arrays:
                back = zarrs[k][i]
        reads.append(time.perf_counter() - start)
        assert np.array_equal(back.view(np.uint16), arrays[k][i].view(np.uint16))
        shutil.rmtree(path)
    return {"codec": codec, "label": label(codec), "bytes": size, "raw_bytes": raw,
            "ratio": raw / size, "write_MBps": raw / min(writes) / 1e6,
            "read_MBps": raw / min(reads) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "store_codec.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    bb, blocks, model_name = load_backbone()
    size = bb.flags.image_size
    x0, source = load_images(args.images, size)
    acts = bb.activations(x0, STEPS, blocks)
    f16 = {f"act_t{t}_b{b}": a.to(torch.float16).numpy() for (t, b), a in acts.items()}
    bf16 = {k: a.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            for k, a in zip(f16, acts.values())}
    raw = sum(a.nbytes for a in f16.values())
    print(f"{model_name}, {source}: steps {STEPS}, blocks {blocks}, {raw / 1e6:.1f} MB of "
          f"float16 activations; {os.cpu_count()} CPU cores, {args.repeat} repeats (best)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in candidates():
            rows.append({**measure(f16, c, Path(tmp), args.repeat, np.float16), "dtype": "float16"})
        from ddpmseg.featcache.store import DEFAULT_CODEC
        rows.append({**measure(bf16, DEFAULT_CODEC, Path(tmp), args.repeat, np.uint16),
                     "dtype": "bfloat16"})

    print(f"\n{'codec':34s} {'dtype':8s} {'MB':>7s} {'ratio':>6s} {'write MB/s':>10s} "
          f"{'read MB/s':>9s}")
    for r in rows:
        print(f"{r['label']:34s} {r['dtype']:8s} {r['bytes'] / 1e6:7.2f} {r['ratio']:6.2f} "
              f"{r['write_MBps']:10.0f} {r['read_MBps']:9.0f}")
    best = max((r for r in rows if r["dtype"] == "float16"), key=lambda r: r["ratio"])
    print(f"\nbest ratio: {best['label']} ({best['ratio']:.2f}x); store default: "
          f"{label(DEFAULT_CODEC)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": model_name, "images": source, "steps": STEPS, "blocks": blocks,
        "raw_float16_bytes": raw, "cpu_count": os.cpu_count(), "repeat": args.repeat,
        "torch": torch.__version__, "zarr": zarr.__version__, "default": DEFAULT_CODEC,
        "results": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Peak RAM and throughput of `fit` (streaming pixel features) against the in-RAM way.

Layout: the LSUN-256 ADM configuration, steps 50, 150, 250 x blocks 5, 6, 7, 8, 12, native
shapes per step (1024,32,32) (512,32,32) (512,32,32) (512,64,64) (256,128,128): 8448 dims per
pixel, 256x256 labels (28 classes, a few ignored pixels). With ``--layout sd512``: Stable Diffusion
1.x's layout at 512px (bench/sd_layout.py: up_blocks 1, 2, 3 of 64x64 latents, (1280,32,32)
(640,64,64) (320,64,64) per step, 6720 dims, 512x512 labels; dense float32 is 7 GB per image, so
run it with ``--speed-images 0``, which skips the in-RAM comparison). One store of synthetic float16 maps
(random normal) is written once under /tmp with FeatureStore.create/write_image (default codec)
and reused by later runs; fits on N images use its first N.

Each measurement runs in its own child process, so its peak RSS (ru_maxrss from wait4) is that
configuration's alone:

- memory: one member trained for --steps minibatches of 64 pixels, streaming, on N = 5, 10, 20,
  30 images, at the default 2 GB pool budget and at a 0.5 GB one. The pool holds
  min(N x 100 MB, budget) (float32) of native maps; above the budget it holds two chunks and loads the
  next in a background thread. The reference's way needs N x 65536 x 8448 x 4 bytes
  (2.2 GB per image: ~66 GB at 30 images) before the first step.
- throughput: pixels/s of the same training streaming versus ``in_memory`` (the dense float32
  features of every labelled pixel in RAM, as the reference) on 2 images, which fit in RAM.
  Both sources live in one process and train in alternating blocks (the ratio is the median
  over block pairs), so a shared machine's changing load hits both alike. The in-memory
  way's peak RSS is measured in a child of its own.

Goals (DESIGN.md section 7): peak RSS flat in N and < 3 GB at 30 images; streaming within 15%
of in-memory throughput. Prints the tables and writes bench/results/fit_memory.json.

    python bench/fit_memory.py [--steps 300] [--speed-steps 200] [--speed-blocks 8]
                               [--images 5,10,20,30] [--budgets 2.0,0.5]
    python bench/fit_memory.py --layout sd512 --speed-images 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import lsun_layout  # noqa: E402
import sd_layout  # noqa: E402

# --layout: the published ADM 256px models' (default) or Stable Diffusion 1.x's at 512px.
LAYOUTS = {"lsun256": lsun_layout, "sd512": sd_layout}
_layout = LAYOUTS[sys.argv[sys.argv.index("--layout") + 1]] if "--layout" in sys.argv \
    else lsun_layout
STEPS, BLOCKS, PER_STEP = _layout.STEPS, _layout.BLOCKS, _layout.PER_STEP
SIZE, FEATURE_DIM = _layout.SIZE, _layout.FEATURE_DIM

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 28
GIB = 1024 ** 3
_LAYOUT_NAME = "lsun256"


def store_info(n: int):
    from ddpmseg.spec import BackboneId
    from ddpmseg.spec import FeatureSpec
    from ddpmseg.featcache.store import StoreInfo

    spec = FeatureSpec(steps=STEPS, blocks=BLOCKS, shapes=PER_STEP * len(STEPS),
                       image_size=SIZE, backbone=BackboneId("synthetic"))
    return StoreInfo(spec, num_images=n, names=tuple(f"synthetic_{i:03d}" for i in range(n)),
                     num_classes=NUM_CLASSES, ignore_label=255,
                     class_names=tuple(f"class_{c}" for c in range(NUM_CLASSES)))


def ensure_store(path: Path, n: int):
    """The synthetic store, written once (about 50 MB per image on disk)."""
    from ddpmseg.core.errors import StoreError
    from ddpmseg.featcache.store import FeatureStore

    try:
        store = FeatureStore.open(path)
        if store.info.num_images >= n and store.complete()[:n].all() and \
                store.info.shapes == store_info(n).shapes:
            return store
    except StoreError:
        pass
    info = store_info(n)
    store = FeatureStore.create(path, info, overwrite=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        maps = [rng.standard_normal(s, dtype=np.float32).astype(np.float16) for s in info.shapes]
        # Blobs of 16x16 pixels per class, about 3% of them ignored.
        cells = rng.integers(0, NUM_CLASSES, (16, 16)).astype(np.uint8)
        cells[rng.random((16, 16)) < 0.03] = 255
        labels = np.kron(cells, np.ones((SIZE[0] // 16, SIZE[1] // 16), np.uint8))
        store.write_image(i, maps, labels)
        print(f"  wrote image {i + 1}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    return store


def subset(store, n: int):
    """The store's first n images, as a FeatureStore (same files, same reading code)."""
    from ddpmseg.featcache.store import FeatureStore

    info = dataclasses.replace(store.info, num_images=n, names=store.info.names[:n])
    return FeatureStore(store.group, info, store.path)


# -- child --------------------------------------------------------------------------------------
def child(args) -> None:
    import torch

    from ddpmseg.classifier import sampler as S
    from ddpmseg.classifier.train import GIB as _GIB, MemberJob, _make_source, train_member
    from ddpmseg.config import ClassifierConfig, Config
    from ddpmseg.featcache.store import FeatureStore

    store = subset(FeatureStore.open(args.store), args.images)
    cfg = Config(classifier=ClassifierConfig(ensemble=1, ram_budget_gb=args.budget, etf="shared"))
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    index = S.PixelIndex.from_store(store)
    shuffle = S.shuffle_images(len(index.images), S.image_bytes(store.info),
                               args.budget * _GIB)
    source = _make_source(store, index, dev, shuffle, args.in_memory, cfg.classifier)
    t_ready = time.perf_counter() - t0
    records = []
    try:
        job = MemberJob(cfg.classifier, store.info.feature_dim, store.info.num_classes,
                        shuffle, dev, progress=False, max_steps=args.steps)
        _, meta = train_member(job, 0, source, index, on_epoch=records.append)
    finally:
        source.close()
    pixels = sum(r["pixels"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    print(json.dumps({"steps": meta["steps"], "pixels": pixels, "train_seconds": seconds,
                      "pixels_per_s": pixels / seconds, "setup_seconds": t_ready,
                      "shuffle_images": shuffle, "labelled_pixels": index.total,
                      "resident": bool(getattr(source, "resident", True)),
                      "torch_threads": torch.get_num_threads()}))


def child_speed(args) -> None:
    """Streaming and in-memory sources side by side in one process, trained in alternating
    blocks of --child-steps minibatches: the machine's load drifts, alternation cancels it."""
    import statistics

    import torch

    from ddpmseg.classifier import sampler as S
    from ddpmseg.classifier.train import MemberJob, train_member
    from ddpmseg.config import ClassifierConfig, Config
    from ddpmseg.featcache.store import FeatureStore

    store = subset(FeatureStore.open(args.store), args.images)
    cfg = Config(classifier=ClassifierConfig(ensemble=1, ram_budget_gb=args.budget, etf="shared"))
    dev = torch.device("cpu")
    index = S.PixelIndex.from_store(store)
    shuffle = S.shuffle_images(len(index.images), S.image_bytes(store.info), args.budget * GIB)
    sources = {"stream": S.StreamSource(store, index, dev, shuffle),
               "in_memory": S.InMemorySource(store, index, dev)}
    rates = {k: [] for k in sources}
    job = MemberJob(cfg.classifier, store.info.feature_dim, store.info.num_classes, shuffle, dev,
                    progress=False, max_steps=args.steps)
    for _ in range(args.blocks):
        for name, source in sources.items():
            records = []
            train_member(job, 0, source, index, on_epoch=records.append)
            rates[name].append(sum(r["pixels"] for r in records) /
                               sum(r["seconds"] for r in records))
    ratios = [a / b for a, b in zip(rates["stream"], rates["in_memory"])]
    print(json.dumps({"blocks": args.blocks, "steps_per_block": args.steps, "rates": rates,
                      "median_pixels_per_s": {k: statistics.median(v) for k, v in rates.items()},
                      "block_ratios": ratios, "median_ratio": statistics.median(ratios),
                      "torch_threads": torch.get_num_threads()}))


def run_child(store: Path, images: int, budget: float, steps: int, in_memory: bool,
              mode: str = "memory", blocks: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--layout", _LAYOUT_NAME, "--child", mode, "--store",
           str(store), "--images",
           str(images), "--budget", str(budget), "--child-steps", str(steps), "--blocks",
           str(blocks)]
    if in_memory:
        cmd.append("--in-memory")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / GIB   # ru_maxrss is in KiB on Linux
    return result


# -- parent ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="lsun256",
                    help="feature layout: ADM 256px (lsun256) or Stable Diffusion 512px (sd512)")
    ap.add_argument("--store", default=None,
                    help="[default: /tmp/ddpmseg_bench/fit_LAYOUT.zarr]")
    ap.add_argument("--images", default="5,10,20,30")
    ap.add_argument("--budgets", default="2.0,0.5", help="pool budgets (GB) for the RSS table")
    ap.add_argument("--steps", type=int, default=300, help="minibatches per memory run")
    ap.add_argument("--speed-images", type=int, default=2,
                    help="images of the in-memory and speed comparison (0: skip it)")
    ap.add_argument("--speed-steps", type=int, default=200, help="minibatches per speed block")
    ap.add_argument("--speed-blocks", type=int, default=8,
                    help="alternating blocks per source in the speed comparison")
    ap.add_argument("--out", default=None,
                    help="[default: bench/results/fit_memory.json; _sd512 added for sd512]")
    ap.add_argument("--child", choices=("memory", "speed"), help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=2.0, help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=300, help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.images = int(args.images)
        args.steps = args.child_steps
        return child(args) if args.child == "memory" else child_speed(args)

    global _LAYOUT_NAME
    _LAYOUT_NAME = args.layout
    suffix = "" if args.layout == "lsun256" else f"_{args.layout}"
    args.store = args.store or f"/tmp/ddpmseg_bench/fit_{args.layout}.zarr"
    args.out = args.out or str(HERE / "results" / f"fit_memory{suffix}.json")
    counts = [int(v) for v in args.images.split(",")]
    budgets = [float(v) for v in args.budgets.split(",")]
    store_path = Path(args.store)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    n_max = max(counts + [args.speed_images])
    print(f"store {store_path} ({n_max} images, {FEATURE_DIM} dims, {SIZE[0]}x{SIZE[1]})", file=sys.stderr)
    ensure_store(store_path, n_max)
    per_image_dense = SIZE[0] * SIZE[1] * FEATURE_DIM * 4

    memory = []
    for budget in budgets:
        for n in counts:
            r = run_child(store_path, n, budget, args.steps, in_memory=False)
            r.update(images=n, budget_gb=budget,
                     reference_dense_gb=r["labelled_pixels"] * FEATURE_DIM * 4 / GIB)
            memory.append(r)
            print(f"  memory: {n} images, budget {budget} GB: {r['peak_rss_gb']:.2f} GB",
                  file=sys.stderr, flush=True)

    in_memory = speed = ratio = None
    if args.speed_images:
        in_memory = run_child(store_path, args.speed_images, 2.0, 100, in_memory=True)
        in_memory.update(images=args.speed_images)
        print(f"  in-memory RSS, {args.speed_images} images: {in_memory['peak_rss_gb']:.2f} GB",
              file=sys.stderr, flush=True)
        speed = run_child(store_path, args.speed_images, 2.0, args.speed_steps, in_memory=False,
                          mode="speed", blocks=args.speed_blocks)
        ratio = speed["median_ratio"]
        print(f"  speed: streaming / in-memory = {ratio:.3f}", file=sys.stderr, flush=True)

    print(f"\nfit peak RSS, one member, {args.steps} minibatches of 64 pixels, streaming "
          f"(reference: dense float32 features of every labelled pixel, "
          f"{per_image_dense / GIB:.2f} GB per image)")
    print(f"{'images':>6} {'budget GB':>9} {'shuffle':>7} {'pool':>9} {'peak RSS GB':>11} "
          f"{'reference GB':>12}")
    for r in memory:
        print(f"{r['images']:>6} {r['budget_gb']:>9.1f} {r['shuffle_images']:>7} "
              f"{'resident' if r['resident'] else '2 chunks':>9} {r['peak_rss_gb']:>11.2f} "
              f"{r['reference_dense_gb']:>12.1f}")
    if speed is not None:
        print(f"\nin memory (the reference's way), {args.speed_images} images: peak RSS "
              f"{in_memory['peak_rss_gb']:.2f} GB (features built in "
              f"{in_memory['setup_seconds']:.0f} s)")
        med = speed["median_pixels_per_s"]
        print(f"\nthroughput on {args.speed_images} images (all resident), one process, "
              f"{args.speed_blocks} alternating blocks of {args.speed_steps} minibatches of 64 "
              f"per source, medians:")
        print(f"     stream: {med['stream']:>10,.0f} pixels/s")
        print(f"  in_memory: {med['in_memory']:>10,.0f} pixels/s")
        print(f"  streaming / in-memory = {ratio:.3f} (median of the block pairs; goal >= 0.85); "
              f"pairs: {', '.join(f'{r:.2f}' for r in speed['block_ratios'])}")

    at30 = [r for r in memory if r["images"] == max(counts)]
    result = {
        "layout": {"name": args.layout, "steps": STEPS, "blocks": BLOCKS, "shapes_per_step": PER_STEP,
                   "image_size": SIZE, "feature_dim": FEATURE_DIM, "num_classes": NUM_CLASSES,
                   "store_dtype": "float16"},
        "memory": memory, "in_memory_run": in_memory, "speed": speed,
        "stream_over_in_memory": ratio,
        "goals": {"peak_rss_gb_at_max_images": {str(r["budget_gb"]): r["peak_rss_gb"]
                                                 for r in at30},
                  "peak_rss_below_3gb": all(r["peak_rss_gb"] < 3 for r in at30),
                  "stream_within_15pct": None if ratio is None else ratio >= 0.85},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

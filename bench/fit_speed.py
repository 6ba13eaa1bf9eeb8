"""Fit throughput: ddpmseg streaming vs ddpmseg in memory vs a reference-style trainer.

One process, one torch thread count, the same labelled pixels, three trainers:

- stream:    ddpmseg's fit from the feature store as ``fit`` runs it by default
             (``sampler.make_source`` within the default 2 GB RAM budget: the dense rows when
             every labelled pixel's features fit the budget, else the bounded pool);
- stream_pool: the same fit forced onto the bounded pool (``StreamSource``), pixel features
             gathered from the pooled native maps as the minibatches go (what a set whose dense
             features exceed the budget gets);
- in_memory: the same training from the dense float32 features of every labelled pixel held in
             RAM (``--in-memory``, an ``InMemorySource``);
- reference: the reference's way, written here from its description: a ``TensorDataset`` over
             the same dense float32 features, a shuffling ``DataLoader`` (batch 64), the
             reference's MLP (Linear-ReLU-BatchNorm1d x2, Linear; N(0, 0.02) init), Adam 1e-3,
             cross-entropy, ``loss.item()`` per step. (The reference also computes a batch
             accuracy each step; that is left out, which can only flatter the reference.)

Ours train with the default config (ETF regulariser "shared", weight 0.4), as a user's fit does.

Two sizes:

- faces64: the faces64 layout at 64 px on real images: ffhq_34's training images (resized to
  64 px) through the bundled faces_64 backbone, steps 50,150,250 x blocks 2,4,5,7,8 (1344 dims,
  34 classes); the store is extracted once under --work and reused.
- lsun256: the LSUN-256 layout (bench/lsun_layout.py, 8448 dims, 256x256 labels, 28 classes),
  random float16 maps, one labelled 16x16 cell in four (a few dense images' worth of pixels).

The machine is shared, so timings drift: each round runs every trainer for --steps minibatches,
in a rotating order, and the figures are per-trainer medians (and bests) over --rounds rounds;
the ratios are medians of the per-round ratios. Rates per CPU second (process time inside the
epochs) are recorded beside the wall-clock ones: on a loaded machine they drift less. Also checked: the members trained streaming
(both ways) and in memory for the same steps are bit-identical (their sha256 is in the JSON, to
compare across versions).

    python bench/fit_speed.py [--sizes faces64,lsun256] [--threads 1] [--steps 300] [--rounds 5]

Prints a table per size and writes bench/results/fit_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "ffhq_34" / "real" / "train"
GIB = 1024 ** 3


# -- stores ----------------------------------------------------------------------------------
def faces64_store(work: Path, data: Path, threads: int):
    """ffhq_34's training images at 64 px through the bundled faces_64 backbone (once)."""
    from ddpmseg import load_config
    from ddpmseg.pipelines.extract import extract

    cfg = load_config("faces64_ffhq_34")
    return extract(data, work / "faces64_ffhq_34_train.zarr", cfg, device="cpu", resize=True,
                   progress=False)


def lsun256_store(work: Path, images: int):
    """Random float16 maps in the LSUN-256 layout; one 16x16 cell in four labelled (once)."""
    sys.path.insert(0, str(HERE))
    from lsun_layout import BLOCKS, PER_STEP, SIZE, STEPS

    from ddpmseg.core.errors import StoreError
    from ddpmseg.spec import BackboneId
    from ddpmseg.spec import FeatureSpec
    from ddpmseg.featcache.store import FeatureStore, StoreInfo

    path = work / f"lsun256_random_{images}.zarr"
    classes = 28
    spec = FeatureSpec(steps=STEPS, blocks=BLOCKS, shapes=PER_STEP * len(STEPS), image_size=SIZE,
                       backbone=BackboneId.random(0))
    info = StoreInfo(spec, num_images=images, names=tuple(f"random_{i:03d}" for i in range(images)),
                     num_classes=classes, ignore_label=255,
                     class_names=tuple(f"class_{c}" for c in range(classes)))
    try:
        store = FeatureStore.open(path)
        if store.complete().all() and store.info.shapes == info.shapes:
            return store
    except StoreError:
        pass
    store = FeatureStore.create(path, info, overwrite=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        maps = [rng.standard_normal(s, dtype=np.float32).astype(np.float16) for s in info.shapes]
        cells = rng.integers(0, classes, (16, 16)).astype(np.uint8)
        cells[rng.random((16, 16)) < 0.75] = 255
        store.write_image(i, maps, np.kron(cells, np.ones((16, 16), np.uint8)))
    return store


# -- the reference-style trainer -------------------------------------------------------------
def reference_mlp(dim: int, num_classes: int):
    import torch
    from torch import nn

    w1, w2 = (128, 32) if num_classes < 30 else (256, 128)
    model = nn.Sequential(nn.Linear(dim, w1), nn.ReLU(), nn.BatchNorm1d(w1),
                          nn.Linear(w1, w2), nn.ReLU(), nn.BatchNorm1d(w2),
                          nn.Linear(w2, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
            torch.nn.init.constant_(m.bias, 0.0)
    return model


def reference_run(x, y, num_classes: int, steps: int, seed: int) -> tuple[float, float]:
    """(pixels per wall second, per CPU second) of ``steps`` minibatches of the reference's
    loop over dense (x, y)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = reference_mlp(x.shape[1], num_classes).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    done = pixels = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb.long())
            loss.backward()
            opt.step()
            loss.item()
            pixels += xb.shape[0]
            done += 1
            if done >= steps:
                break
    return pixels / (time.perf_counter() - t0), pixels / (time.process_time() - c0)


def gather_profile(store, index, rounds: int, runs: int = 200) -> dict:
    """ms per 64 pixels of the pool gather, split into its parts, the way before this version
    (taps and weights looked up per run, then one strided copy per column segment) and now
    (taps once per chunk, then ``MapLayout.gather``), beside the dense row copy; interleaved,
    medians over ``rounds``. Every way gives the same rows bit for bit (checked)."""
    import torch
    import torch.nn.functional as F

    from ddpmseg.classifier import sampler as S

    src = S.StreamSource(store, index, torch.device("cpu"), len(index.images))
    bufs, slot_of = src._load_resident()
    dense = S.InMemorySource(store, index, torch.device("cpu"))
    layout = src.layout
    plan = S.EpochPlan(index, len(index.images), 0, 64)
    img, rows = plan.chunk_rows(0, 0, plan.image_chunks(0)[0])
    run = S.run_pixels(64, layout.dim)
    runs = min(runs, len(rows) // run)
    parts = {"before: taps per run": 0.0, "before: embedding_bag": 0.0,
             "before: segment copies": 0.0, "now: taps once (per run)": 0.0,
             "now: embedding_bag + cat": 0.0, "dense row copy": 0.0}
    out = {k: [] for k in parts}

    def before(a):
        t0 = time.perf_counter()
        slots = slot_of[torch.from_numpy(img[a:a + run])]
        flat = torch.from_numpy(index.flat[rows[a:a + run]].astype(np.int64))
        taps, weights = layout.taps(slots, flat)
        res = torch.empty((len(flat), layout.dim))
        t1 = time.perf_counter()
        got = [F.embedding_bag(taps[g], b.view(-1, c), mode="sum", per_sample_weights=weights[g])
               for g, ((_, _, c, _), b) in enumerate(zip(layout.groups, bufs))]
        t2 = time.perf_counter()
        for g, (*_, segments) in enumerate(layout.groups):
            for c0, c1, fcol in segments:
                res[:, fcol:fcol + c1 - c0] = got[g][:, c0:c1]
        parts["before: taps per run"] += t1 - t0
        parts["before: embedding_bag"] += t2 - t1
        parts["before: segment copies"] += time.perf_counter() - t2
        return res

    t0 = time.perf_counter()
    taps, weights = layout.taps(slot_of[torch.from_numpy(img)],
                                torch.from_numpy(index.flat[rows].astype(np.int64)))
    once = (time.perf_counter() - t0) * run / len(rows)
    rows_t = torch.from_numpy(rows)
    for _ in range(rounds):
        for k in parts:
            parts[k] = 0.0
        for i in range(runs):
            a = i * run
            want = before(a)
            t0 = time.perf_counter()
            got = layout.gather(bufs, taps[:, a:a + run], weights[:, a:a + run])
            t1 = time.perf_counter()
            row = torch.index_select(dense.x, 0, rows_t[a:a + run])
            t2 = time.perf_counter()
            parts["now: embedding_bag + cat"] += t1 - t0
            parts["dense row copy"] += t2 - t1
            parts["now: taps once (per run)"] += once
            if i == 0 and not (torch.equal(got, want) and torch.equal(row, want)):
                raise SystemExit("error: the gathers disagree; this is a bug")
        for k, v in parts.items():
            out[k].append(1e3 * v * 64 / (runs * run))
    src.close()
    dense.close()
    return {k: statistics.median(v) for k, v in out.items()}


def member_digest(state: dict) -> str:
    """sha256 of a member's weights (names and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


# -- one size --------------------------------------------------------------------------------
def measure(name: str, store, steps: int, rounds: int) -> dict:
    import torch

    from ddpmseg.classifier import sampler as S
    from ddpmseg.classifier.train import GIB as _GIB, MemberJob, train_member
    from ddpmseg.config import ClassifierConfig, Config

    info = store.info
    cfg = Config(classifier=ClassifierConfig(ensemble=1))
    dev = torch.device("cpu")
    index = S.PixelIndex.from_store(store)
    shuffle = S.shuffle_images(len(index.images), S.image_bytes(info),
                               cfg.classifier.ram_budget_gb * _GIB)
    t0 = time.perf_counter()
    sources = {"stream": S.make_source(store, index, dev, shuffle,
                                       cfg.classifier.ram_budget_gb * _GIB)}
    t1 = time.perf_counter()
    sources["stream_pool"] = S.StreamSource(store, index, dev, shuffle)
    t2 = time.perf_counter()
    sources["in_memory"] = S.InMemorySource(store, index, dev)
    t3 = time.perf_counter()
    stream_kind = "dense rows" if isinstance(sources["stream"], S.InMemorySource) else "pool"
    # The reference's dataset: the very same dense features and labels.
    x = sources["in_memory"].x
    y = torch.from_numpy(index.labels.astype(np.int64))
    print(f"{name}: {index.total:,} labelled pixels in {len(index.images)} images, "
          f"{info.feature_dim} dims; dense float32 {x.numel() * 4 / GIB:.2f} GB", file=sys.stderr,
          flush=True)

    # Where the time goes: seconds inside the feature gather (pool) or row copy (dense rows).
    gather = {k: 0.0 for k in sources}
    for kind, src in sources.items():
        attr = "_featurize" if isinstance(src, S.InMemorySource) else "_features"

        def timed(*a, _f=getattr(src, attr), _k=kind):
            t = time.perf_counter()
            r = _f(*a)
            gather[_k] += time.perf_counter() - t
            return r
        setattr(src, attr, timed)
    gather_ms = {k: [] for k in sources}
    states = {}
    # CPU seconds inside the epochs too: on a shared machine they drift less than wall time.
    from ddpmseg.classifier import train as T

    cpu = {"seconds": 0.0}
    real_epoch = T._train_epoch

    def timed_epoch(*a, **kw):
        c = time.process_time()
        try:
            return real_epoch(*a, **kw)
        finally:
            cpu["seconds"] += time.process_time() - c
    T._train_epoch = timed_epoch

    def ours(kind: str) -> tuple[float, float]:
        gather[kind] = 0.0
        cpu["seconds"] = 0.0
        records = []
        job = MemberJob(cfg.classifier, info.feature_dim, info.num_classes, shuffle, dev,
                        progress=False, max_steps=steps)
        state, _ = train_member(job, 0, sources[kind], index, on_epoch=records.append)
        states.setdefault(kind, state)
        gather_ms[kind].append(1e3 * gather[kind] / sum(r["steps"] for r in records))
        pixels = sum(r["pixels"] for r in records)
        return pixels / sum(r["seconds"] for r in records), pixels / cpu["seconds"]

    runners = {k: (lambda k=k: ours(k)) for k in sources}
    runners["reference"] = lambda: reference_run(x, y, info.num_classes, steps, 0)
    names = list(runners)
    rates = {k: [] for k in names}
    cpu_rates = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            wall, per_cpu = runners[k]()
            rates[k].append(wall)
            cpu_rates[k].append(per_cpu)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {rates[k][-1]:,.0f}"
                                                       for k in names) + " pixels/s",
              file=sys.stderr, flush=True)
    T._train_epoch = real_epoch
    for s in sources.values():
        s.close()
    digests = {k: member_digest(v) for k, v in states.items()}

    def ratios(num, den, of=rates):
        return [p / q for p, q in zip(of[num], of[den])]

    out = {"feature_dim": info.feature_dim, "image_size": list(info.image_size),
           "images": len(index.images), "labelled_pixels": index.total,
           "num_classes": info.num_classes, "steps_per_round": steps, "rounds": rounds,
           "stream_source": stream_kind,
           "dense_gb": S.dense_bytes(index, info.feature_dim) / _GIB,
           "ram_budget_gb": cfg.classifier.ram_budget_gb,
           "setup_seconds": {"stream": round(t1 - t0, 2), "stream_pool": round(t2 - t1, 2),
                             "in_memory": round(t3 - t2, 2)},
           "pixels_per_s": rates,
           "median_pixels_per_s": {k: statistics.median(v) for k, v in rates.items()},
           "best_pixels_per_s": {k: max(v) for k, v in rates.items()},
           "stream_over_in_memory": statistics.median(ratios("stream", "in_memory")),
           "stream_pool_over_in_memory": statistics.median(ratios("stream_pool", "in_memory")),
           "cpu_pixels_per_s": cpu_rates,
           "stream_over_in_memory_cpu": statistics.median(ratios("stream", "in_memory",
                                                                 cpu_rates)),
           "stream_pool_over_in_memory_cpu": statistics.median(ratios("stream_pool", "in_memory",
                                                                      cpu_rates)),
           "stream_over_reference": statistics.median(ratios("stream", "reference")),
           "in_memory_over_reference": statistics.median(ratios("in_memory", "reference")),
           "gather_ms_per_step": {k: statistics.median(v) for k, v in gather_ms.items()},
           "step_ms": {k: 64e3 / v for k, v in
                       {k: statistics.median(rates[k]) for k in rates}.items()},
           "member_sha256": digests,
           "members_bit_identical": len(set(digests.values())) == 1}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="faces64,lsun256")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: ddpmseg's default, see ddpmseg.core.device)")
    ap.add_argument("--steps", type=int, default=300, help="minibatches per trainer and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lsun-images", type=int, default=2)
    ap.add_argument("--data", default=str(DATA), help="ffhq_34 training images (faces64)")
    ap.add_argument("--work", default="/tmp/ddpmseg_bench/fit_speed")
    ap.add_argument("--out", default=str(HERE / "results" / "fit_speed.json"))
    args = ap.parse_args()

    import torch

    from ddpmseg.classifier import sampler as S
    from ddpmseg.core.device import set_threads

    threads = set_threads(args.threads)
    import logging
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in args.sizes.split(","):
        if size == "faces64":
            store = faces64_store(work, Path(args.data), threads)
        elif size == "lsun256":
            store = lsun256_store(work, args.lsun_images)
        else:
            raise SystemExit(f"error: unknown size {size!r}; use faces64 and/or lsun256")
        results[size] = measure(size, store, args.steps, args.rounds)
        results[size]["gather_profile_ms_per_64px"] = gather_profile(
            store, S.PixelIndex.from_store(store), args.rounds)

    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "note": "shared machine: rounds alternate the trainers; medians and bests"}
    print(f"\nfit throughput, one member, {args.steps} minibatches of 64 per trainer and round, "
          f"{args.rounds} rounds in rotating order, {threads} torch thread(s), "
          f"{os.cpu_count()} CPUs (shared)")
    for size, r in results.items():
        med, best = r["median_pixels_per_s"], r["best_pixels_per_s"]
        print(f"\n{size}: {r['feature_dim']} dims, {r['labelled_pixels']:,} labelled pixels "
              f"in {r['images']} images")
        print(f"  {'trainer':<10} {'median px/s':>12} {'best px/s':>12}")
        for k in med:
            print(f"  {k:<10} {med[k]:>12,.0f} {best[k]:>12,.0f}")
        print(f"  streaming ({r['stream_source']}, dense {r['dense_gb']:.2f} GB, budget "
              f"{r['ram_budget_gb']:g} GB) / in-memory = {r['stream_over_in_memory']:.3f} "
              f"(goal >= 0.95); pool gather forced / in-memory = "
              f"{r['stream_pool_over_in_memory']:.3f}; per CPU second: "
              f"{r['stream_over_in_memory_cpu']:.3f} and {r['stream_pool_over_in_memory_cpu']:.3f}"
              ", "
              f"streaming / reference = {r['stream_over_reference']:.2f}, "
              f"in-memory / reference = {r['in_memory_over_reference']:.2f} "
              f"(medians of per-round ratios)")
        g, st = r["gather_ms_per_step"], r["step_ms"]
        print("  profile, ms per minibatch (medians), of which feature gather / row copy: "
              + "; ".join(f"{k} {st[k]:.2f} ({g[k]:.2f})" for k in g)
              + f"; reference {st['reference']:.2f}")
        prof = r["gather_profile_ms_per_64px"]
        print("  gather alone, ms per 64 pixels (medians): "
              + ", ".join(f"{k} {v:.3f}" for k, v in prof.items()))
        print(f"  members streaming (both) vs in memory bit-identical: "
              f"{r['members_bit_identical']} ({next(iter(r['member_sha256'].values()))[:16]})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "threads": threads, "results": results},
                              indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

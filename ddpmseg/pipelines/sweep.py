"""``ddpmseg sweep``: which stored (step, block) maps to train on.

A store keeps every extracted (step, block) map at its native resolution, so the question
"which steps and blocks matter" costs no extraction: from one training store and one test
store,

1. each map alone: a small pixel classifier (the project's PixelMLP) is trained on a fixed
   sample of labelled training pixels (the same pixels for every map) and scored by test
   mIoU (reference rule: ignore-label ground truth counted in the unions) on a fixed sample of
   test pixels, for each of ``seeds`` seeds: a steps x blocks table;
2. greedy forward selection among the best ``candidates`` single maps: each round adds the
   map that raises the mean test mIoU most, while the total dims stay within ``budget``: the
   curve of mIoU against dims;
3. the config: the steps and blocks of the best point of the curve (a store holds every
   step x block pair, so the config is their grid), scored like the rest, beside any grid
   given to compare (``compare``, e.g. the default steps and blocks).

Only the arrays of the maps being scored are read (``FeatureStore.map``), once each; their
features at the sampled pixels are kept (float16) for the greedy rounds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from ddpmseg.classifier.model import PixelMLP
from ddpmseg.classifier.sampler import PixelIndex
from ddpmseg.core.device import use_threads
from ddpmseg.core.errors import ConfigError, StoreMismatchError
from ddpmseg.core.fileio import write_csv, write_json, write_png
from ddpmseg.core.locking import reader_lock, writer_lock
from ddpmseg.featcache import FeatureStore, pixels
from ddpmseg.outputs import render
from ddpmseg.outputs.evaluate import iou_from_confusion
from ddpmseg.spec import TOLERATED

log = logging.getLogger(__name__)

Key = tuple[int, object]


@dataclass
class SweepSettings:
    pixels: int = 20000          # labelled training pixels (fixed sample)
    test_pixels: int = 40000     # test pixels (fixed sample, labelled or not)
    seeds: int = 3
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    candidates: int = 10         # single maps the greedy selection chooses among
    budget: int | None = None    # largest total dims of a selection (None: no limit)
    max_maps: int = 8
    sample_seed: int = 0


@dataclass
class Score:
    keys: tuple
    dims: int
    mious: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.mious))

    @property
    def std(self) -> float:
        return float(np.std(self.mious))


def _sample(store: FeatureStore, n: int, seed: int, labelled: bool):
    """{image index: (ys, xs, labels)}: n pixels drawn without replacement, uniformly from
    the labelled pixels (``labelled``) or from all pixels, of the store's active images."""
    height, width = store.info.image_size
    rng = np.random.default_rng(seed)
    index = PixelIndex.from_store(store)
    if labelled:
        total = index.total
        pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
        image_of = np.searchsorted(index.offsets, pick, side="right") - 1
        out = {}
        for i in np.unique(image_of):
            rows = pick[image_of == i]
            flat = index.flat[rows]
            out[int(i)] = (flat // width, flat % width, index.labels[rows])
        return out
    images = index.images if len(index.images) else np.arange(len(store))
    total = len(images) * height * width
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out = {}
    for k, i in enumerate(images):
        sel = pick[(pick >= k * height * width) & (pick < (k + 1) * height * width)]
        flat = sel - k * height * width
        lab = store.labels(int(i)).ravel()[flat]
        out[int(i)] = (flat // width, flat % width, lab)
    return out


class _Features:
    """Per map, its features at a fixed pixel sample (float16), read from the store once."""

    def __init__(self, store: FeatureStore, sample: dict):
        self.store, self.sample = store, sample
        self.labels = torch.from_numpy(np.concatenate([s[2] for s in sample.values()])
                                       .astype(np.int64))
        self._cache: dict = {}

    def get(self, keys: Sequence[Key]) -> torch.Tensor:
        parts = []
        for key in keys:
            if key not in self._cache:
                rows = [pixels.pixel_features([self.store.map(i, *key)],
                                              self.store.info.image_size, ys, xs)
                        for i, (ys, xs, _) in self.sample.items()]
                self._cache[key] = torch.cat(rows).half()
            parts.append(self._cache[key])
        return torch.cat(parts, dim=1).float()


def _train_score(xtr, ytr, xte, yte, num_classes: int, ignore_label: int, seed: int,
                 s: SweepSettings) -> float:
    """Test mIoU of one PixelMLP trained on (xtr, ytr) with ``seed``. The caller's random
    state is left alone: PixelMLP's default init draws from torch's global generator, so it
    is built under a forked one seeded with ``seed``; the batches come from a Generator."""
    # Standardised inputs: maps of different steps and blocks differ in scale by orders of
    # magnitude, and one small classifier must rank them fairly.
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixelMLP(xtr.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for k in range(0, len(order) - 1, s.batch_size):
            idx = order[k:k + s.batch_size]
            if len(idx) < 2:
                continue
            loss = functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte[k:k + 8192]).argmax(1) for k in range(0, len(xte), 8192)])
    pairs = yte.numpy() * 256 + pred.numpy()
    conf = np.bincount(pairs, minlength=256 * 256).reshape(256, 256)
    return iou_from_confusion(conf, num_classes, ignore_label)[1]


def _check_stores(train: FeatureStore, test: FeatureStore) -> None:
    diffs = train.info.spec.differences(test.info.spec, "in TRAIN_STORE", "in TEST_STORE",
                                        ignore=TOLERATED["sweep"])
    for key in ("num_classes", "ignore_label"):
        if getattr(train.info, key) != getattr(test.info, key):
            diffs.append(key)
    if diffs:
        raise StoreMismatchError("the train and test stores differ: " + "; ".join(diffs),
                                 "extract both with the same checkpoint and settings")
    if not train.info.has_labels or not test.info.has_labels:
        raise StoreMismatchError("both stores need labels", "extract folders with masks")
    missing = [k for k in train.info.keys if k not in test.info.keys]
    if missing:
        raise StoreMismatchError(f"the test store lacks maps of the training store: {missing[:4]}",
                                 "extract the test images with the same steps and blocks")


class Sweep:
    """The state of one sweep: the two stores' samples and a scorer of map sets."""

    def __init__(self, train, test, settings: SweepSettings | None = None):
        self.train = train if isinstance(train, FeatureStore) else FeatureStore.open(train)
        self.test = test if isinstance(test, FeatureStore) else FeatureStore.open(test)
        _check_stores(self.train, self.test)
        self.s = settings or SweepSettings()
        if self.s.seeds < 1 or self.s.pixels < 2 or self.s.epochs < 1:
            raise ConfigError(f"seeds and epochs must be >= 1 and pixels >= 2, got seeds="
                              f"{self.s.seeds}, epochs={self.s.epochs}, pixels={self.s.pixels}",
                              "give `seeds=1`, `epochs=1`, `pixels=2` or more")
        info = self.train.info
        self.keys = list(info.keys)
        self.channels = {k: shape[0] for k, shape in zip(info.keys, info.shapes)}
        self.xtr = _Features(self.train, _sample(self.train, self.s.pixels,
                                                 self.s.sample_seed, True))
        self.xte = _Features(self.test, _sample(self.test, self.s.test_pixels,
                                                self.s.sample_seed + 1, False))

    def dims(self, keys) -> int:
        return sum(self.channels[k] for k in keys)

    def score(self, keys: Sequence[Key]) -> Score:
        keys = tuple(keys)
        xtr, xte = self.xtr.get(keys), self.xte.get(keys)
        info = self.train.info
        out = Score(keys, self.dims(keys))
        for seed in range(self.s.seeds):
            out.mious.append(_train_score(xtr, self.xtr.labels, xte, self.xte.labels,
                                          info.num_classes, info.ignore_label, seed, self.s))
        return out

    def singles(self) -> dict:
        out = {}
        for n, k in enumerate(self.keys, 1):
            out[k] = self.score([k])
            log.info("map %d/%d t=%s b=%s (%d dims): mIoU %.2f +- %.2f", n, len(self.keys), *k,
                     out[k].dims, 100 * out[k].mean, 100 * out[k].std)
        return out

    def greedy(self, singles: dict) -> list[Score]:
        ranked = sorted(singles, key=lambda k: -singles[k].mean)[:self.s.candidates]
        chosen: list = []
        curve = []
        while len(chosen) < self.s.max_maps:
            options = [k for k in ranked if k not in chosen and (
                self.s.budget is None or self.dims(chosen + [k]) <= self.s.budget)]
            if not options:
                break
            scores = [singles[k] if not chosen else self.score(chosen + [k]) for k in options]
            best = max(range(len(options)), key=lambda j: scores[j].mean)
            chosen.append(options[best])
            curve.append(scores[best])
            log.info("greedy %d: + t=%s b=%s -> %d dims, mIoU %.2f +- %.2f", len(chosen),
                     *options[best], curve[-1].dims, 100 * curve[-1].mean, 100 * curve[-1].std)
        return curve

    def grid(self, steps, blocks) -> list:
        missing = [(t, b) for t in steps for b in blocks if (t, b) not in self.channels]
        if missing:
            raise ConfigError(f"the stores hold no map for {missing[:3]}",
                              f"choose among steps {self.train.info.steps}, blocks "
                              f"{self.train.info.blocks}")
        return [(t, b) for t in steps for b in blocks]


def sweep(train, test, out_dir, settings: SweepSettings | None = None,
          compare: Sequence[tuple[Sequence[int], Sequence]] = (), *,
          threads: int | None = None) -> dict:
    """Run the whole sweep; write sweep.csv, sweep.png, greedy.csv and sweep.json into
    ``out_dir``; return the summary (what sweep.json holds). Torch runs on ``threads``
    threads (default: torch's), restored after."""
    # Both stores are read under a shared lock: no extract rewrites them meanwhile.
    with use_threads(threads), \
            reader_lock(getattr(train, "path", train), "store"), \
            reader_lock(getattr(test, "path", test), "store"), \
            writer_lock(Path(out_dir), "sweep folder"):
        return _sweep(train, test, out_dir, settings, compare)


def _sweep(train, test, out_dir, settings, compare) -> dict:
    started = time.perf_counter()
    sw = Sweep(train, test, settings)
    s = sw.s
    info = sw.train.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    singles = sw.singles()
    steps, blocks = list(info.steps), list(info.blocks)
    table = np.array([[singles[(t, b)].mean for b in blocks] for t in steps])
    spread = np.array([[singles[(t, b)].std for b in blocks] for t in steps])
    write_csv(out / "sweep.csv", [["step \\ block"] + [str(b) for b in blocks]] + [
        [t] + [f"{100 * v:.2f} +- {100 * d:.2f}" for v, d in zip(row, dev)]
        for t, row, dev in zip(steps, table, spread)])
    heat = render.value_grid(100 * table, [f"t={t}" for t in steps], [f"b={b}" for b in blocks],
                             f"test mIoU (%) of each map alone, mean of {s.seeds} seeds",
                             "rows: diffusion step, columns: decoder block")
    write_png(out / "sweep.png", heat)

    curve = sw.greedy(singles)
    write_csv(out / "greedy.csv", [["maps", "added", "dims", "miou", "std"]] + [
        [k, f"t{sc.keys[-1][0]}_b{sc.keys[-1][1]}", sc.dims, f"{100 * sc.mean:.2f}",
         f"{100 * sc.std:.2f}"] for k, sc in enumerate(curve, 1)])
    best = max(curve, key=lambda sc: sc.mean)
    best_steps = [t for t in steps if any(k[0] == t for k in best.keys)]
    best_blocks = [b for b in blocks if any(k[1] == b for k in best.keys)]
    grids = {"sweep's choice": (best_steps, best_blocks)}
    for c_steps, c_blocks in compare:
        grids[f"steps {','.join(map(str, c_steps))} blocks {','.join(map(str, c_blocks))}"] = \
            (list(c_steps), list(c_blocks))
    compared = {}
    for name, (g_steps, g_blocks) in grids.items():
        sc = sw.score(sw.grid(g_steps, g_blocks))
        compared[name] = {"steps": g_steps, "blocks": g_blocks, "dims": sc.dims,
                          "mious": sc.mious, "miou": sc.mean, "std": sc.std}
    summary = {
        "train": sw.train.path, "test": sw.test.path, "settings": vars(s),
        "singles": {f"t{t}_b{b}": {"dims": v.dims, "mious": v.mious}
                    for (t, b), v in singles.items()},
        "greedy": [{"added": list(sc.keys[-1]), "dims": sc.dims, "mious": sc.mious}
                   for sc in curve],
        "best": {"maps": [list(k) for k in best.keys], "dims": best.dims, "miou": best.mean},
        "compared": compared,
        "config": {"steps": best_steps, "blocks": best_blocks},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "sweep.json", summary, default=str)
    return summary


def format_summary(summary: dict) -> str:
    """The text ``ddpmseg sweep`` prints: the curve, the comparison and the config lines."""
    lines = ["greedy selection (mIoU % against dims):"]
    for k, g in enumerate(summary["greedy"], 1):
        t, b = g["added"]
        lines.append(f"  {k}. + t={t} b={b}: {g['dims']} dims, "
                     f"{100 * np.mean(g['mious']):.2f} +- {100 * np.std(g['mious']):.2f}")
    lines.append("grids (test mIoU %, mean +- std over seeds):")
    for name, c in summary["compared"].items():
        lines.append(f"  {name}: steps {c['steps']} blocks {c['blocks']} ({c['dims']} dims): "
                     f"{100 * c['miou']:.2f} +- {100 * c['std']:.2f}")
    cfg = summary["config"]
    lines += ["config to use:", "[features]", f"steps = {json.dumps(cfg['steps'])}",
              f"blocks = {json.dumps(cfg['blocks'])}"]
    return "\n".join(lines)

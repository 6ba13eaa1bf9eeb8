"""Cost against pool size: each `ddpmseg` command of the label-efficient loop, timed as a whole
process over pools of synthetic 64 px scenes, with its peak RSS.

A pool of N scenes (random rectangles, ellipses and triangles on smooth backgrounds, from
seed k for scene k: the same pool every time) and 8 labelled scenes of the same kind; the
bundled faces_64 backbone with its default steps and blocks, one torch thread. Per pool:

    extract POOL STORE; the same again (no-op); one more image, again (+1 image);
    verify STORE; predict RUN STORE; predict RUN POOL (from images); suggest RUN STORE;
    report PRED

where RUN is an ensemble fitted once on the 8 labelled scenes. Each command runs as its own
child process (os.wait4 gives its peak RSS and CPU time); time per image is the command's
wall time over the pool size, CPU per image its user + system CPU time over the pool size (the
steadier figure on a shared machine). Also files and bytes per image of the store and of the prediction folder.
Writes bench/results/scale.json (merged with earlier pool sizes) and
bench/results/scale.png (or the --results file's name with .png; CPU seconds per image against pool size, log axes, drawn with Pillow).

    python bench/scale.py --pools 100,1000 [--work /tmp/ddpmseg-scale] [--ensemble 10]
    python bench/scale.py --plot-only        # redraw the PNG from scale.json
    python bench/scale.py --pools 100,1000,10000 --steps 50 --ensemble 2 \
        --results bench/results/scale_light.json --work /tmp/ddpmseg-scale-light
                                             # lighter per image: the 10,000 pool in ~1 hour

``--steps`` (extract's, comma-separated) and ``--ensemble`` make each image cheaper, so that
what grows with the pool (listing, records, stat cache, shards, pages) is a larger share of
each command; compare pool sizes only within one results file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddpmseg.featcache.store import DEFAULT_IMAGES_PER_SHARD, FORMAT_VERSION

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
SIZE = 64
NUM_CLASSES = 4          # background, rectangle, ellipse, triangle
TRAIN_IMAGES = 8
DDPMSEG = [str(Path(sys.executable).parent / "ddpmseg")]
COMMANDS = ("extract", "re-extract", "+1 image", "verify", "predict (store)",
            "predict (images)", "suggest", "report")


# -- the pool ---------------------------------------------------------------------------------
def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, uint8 labels) of scene ``seed``: 2-5 shapes on a gradient."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, SIZE)[:, None, None]
    background = (a * (1 - t) + b * t) * np.ones((1, SIZE, 1))
    image = Image.fromarray(background.astype(np.uint8))
    labels = Image.new("L", (SIZE, SIZE), 0)
    draw, mask = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(1, NUM_CLASSES))
        x0, y0 = rng.integers(0, SIZE - 12, 2)
        w, h = rng.integers(10, 30, 2)
        box = [int(x0), int(y0), int(min(SIZE - 1, x0 + w)), int(min(SIZE - 1, y0 + h))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for d, fill in ((draw, colour), (mask, kind)):
            if kind == 1:
                d.rectangle(box, fill=fill)
            elif kind == 2:
                d.ellipse(box, fill=fill)
            else:
                d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                          fill=fill)
    return np.asarray(image), np.asarray(labels)


def make_pool(folder: Path, n: int, first: int = 0, masks: bool = False) -> Path:
    """Scenes first..first+n-1 as PNGs (with .npy masks) in ``folder``; kept if present."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + n):
        path = folder / f"scene{k:06d}.png"
        if path.exists():
            continue
        image, labels = scene(k)
        Image.fromarray(image).save(path)
        if masks:
            np.save(path.with_suffix(".npy"), labels)
    return folder


# -- timing -----------------------------------------------------------------------------------
def timed(args: list[str], log) -> dict:
    """Run a command as a child process: wall seconds and peak RSS (GB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(DDPMSEG + ["--no-progress"] + args, stdout=log, stderr=log,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):   # verify exits 1 on damage; none is expected
        raise SystemExit(f"failed ({proc.returncode}): ddpmseg {' '.join(args)}")
    return {"s": round(seconds, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_gb": round(usage.ru_maxrss / 1024 ** 2, 3)}


def tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def fitted_run(work: Path, ensemble: int, steps: list[str], log) -> Path:
    run = work / "run"
    if (run / "member_00.pt").exists():
        return run
    train = make_pool(work / "train", TRAIN_IMAGES, first=10 ** 7, masks=True)
    subprocess.run(DDPMSEG + ["--no-progress", "extract", str(train), str(work / "train.zarr"),
                              "--checkpoint", "bundled:faces_64", "--num-classes",
                              str(NUM_CLASSES), "--threads", "1", *steps], check=True,
                   stderr=log)
    subprocess.run(DDPMSEG + ["--no-progress", "fit", str(work / "train.zarr"), str(run),
                              "--ensemble", str(ensemble), "--max-epochs", "2", "--threads",
                              "1"], check=True, stderr=log)
    return run


def measure_pool(work: Path, n: int, run: Path, steps: list[str], log, save) -> dict:
    """Every command over a pool of ``n``; ``save(partial)`` after each (a run stopped early
    keeps what it measured)."""
    base = work / f"pool{n}"
    if base.exists():
        shutil.rmtree(base)
    pool = make_pool(base / "images", n)
    store, pred, sugg = base / "pool.zarr", base / "pred", base / "suggest"
    extract = ["extract", str(pool), str(store), "--checkpoint", "bundled:faces_64",
               "--num-classes", str(NUM_CLASSES), "--threads", "1", *steps]
    out = {"images": n}
    n1 = n + 1

    def step(cmd: str, args: list[str]) -> None:
        out[cmd] = timed(args, log)
        for key in ("s", "cpu_s"):
            out[cmd][f"{key}_per_image"] = round(out[cmd][key] / (n if cmd == "extract"
                                                                 else n1), 5)
        save(out)

    step("extract", extract)
    step("re-extract", extract)
    make_pool(pool, 1, first=n)
    step("+1 image", extract)
    files, size = tree_size(store)
    out["store_files_per_image"] = round(files / n1, 3)
    out["store_bytes_per_image"] = round(size / n1)
    step("verify", ["verify", str(store)])
    step("predict (store)", ["predict", str(run), str(store), str(pred), "--images", str(pool),
                             "--threads", "1"])
    files, size = tree_size(pred)
    out["pred_files_per_image"] = round(files / n1, 3)
    out["pred_bytes_per_image"] = round(size / n1)
    step("predict (images)", ["predict", str(run), str(pool), str(base / "pred_img"),
                              "--threads", "1"])
    step("suggest", ["suggest", str(run), str(store), "--out", str(sugg), "--images",
                     str(pool), "--threads", "1"])
    step("report", ["report", str(pred)])
    return out


# -- the plot -----------------------------------------------------------------------------
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


KEY = "cpu_s_per_image"   # what the plot shows


def plot(pools: dict, path: Path, what: str) -> None:
    """CPU seconds per image against pool size, both on log axes, one line per command."""
    sizes = sorted(int(n) for n in pools if all(c in pools[n] for c in COMMANDS))
    if not sizes:
        return
    values = [pools[str(n)][c][KEY] for n in sizes for c in COMMANDS]
    xlo, xhi = math.floor(math.log10(min(sizes))), math.ceil(math.log10(max(sizes)))
    xhi = max(xhi, xlo + 1)
    ylo, yhi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    w, h, left, right, top, bottom = 900, 560, 80, 230, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def xy(n, v):
        fx = (math.log10(n) - xlo) / (xhi - xlo)
        fy = (math.log10(v) - ylo) / max(1e-9, yhi - ylo)
        return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(xlo, xhi + 1):
        x, _ = xy(10 ** e, 10 ** ylo)
        d.line([x, top, x, h - bottom], fill=(225, 225, 225))
        d.text((x - 12, h - bottom + 8), f"{10 ** e:,}", fill="black")
    for e in range(ylo, yhi + 1):
        _, y = xy(10 ** xlo, 10 ** e)
        d.line([left, y, w - right, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"{10.0 ** e:g} s", fill="black")
    d.text((left + 180, h - 25), "pool size (images, log)", fill="black")
    d.text((left, 12), f"CPU seconds per image per command (log); {what}", fill="black")
    for k, cmd in enumerate(COMMANDS):
        pts = [xy(n, pools[str(n)][cmd][KEY]) for n in sizes]
        colour = COLOURS[k % len(COLOURS)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        ly = top + 10 + 22 * k
        d.line([w - right + 15, ly + 6, w - right + 40, ly + 6], fill=colour, width=3)
        d.text((w - right + 46, ly), cmd, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", default="100,1000")
    ap.add_argument("--work", default="/tmp/ddpmseg-scale")
    ap.add_argument("--ensemble", type=int, default=10)
    ap.add_argument("--steps", default="", help="extract's --steps (default: the backbone's)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="results JSON (merged with earlier pool sizes); the PNG beside it")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    steps = ["--steps", args.steps] if args.steps else []
    results = (json.loads(args.results.read_text()) if args.results.exists()
               else {"pools": {}})
    if not args.plot_only:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "commands.log", "a") as log:
            run = fitted_run(work, args.ensemble, steps, log)
            for n in (int(x) for x in args.pools.split(",")):
                measure_pool(work, n, run, steps, log,
                             lambda out, n=n: save(results, n, out, args))
                print(json.dumps({str(n): results["pools"][str(n)]}), flush=True)
    plot(results["pools"], args.results.with_suffix(".png"),
         f"{results.get('backbone', '')}, ensemble "
         f"{results.get('ensemble', '?')}, 1 thread, 64 px scenes")


def save(results: dict, n: int, out: dict, args) -> None:
    results["pools"][str(n)] = out
    results.update(
        bench="bench/scale.py",
        backbone=f"bundled:faces_64 (steps {args.steps or 'default'}, default blocks)",
        ensemble=args.ensemble, threads=1, image_size=SIZE,
        store_format=f"format {FORMAT_VERSION}, {DEFAULT_IMAGES_PER_SHARD} images per shard (extract's default)",
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                "shared with other jobs (wall times noisy; CPU times steadier)",
        python=platform.python_version())
    args.results.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

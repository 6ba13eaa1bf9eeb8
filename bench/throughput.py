"""Predict and suggest throughput on a pool of synthetic 64 px scenes, and where the time goes.

The pool, its store and the run are bench/scale.py's (made here when missing: scenes from
bench/scale.py, the bundled faces_64 backbone with its default steps and blocks, a 10-member
ensemble fitted on 8 labelled scenes). In this process, one torch thread:

- predict from the store and from the images, each with the default pictures (overlays for
  the first ``PICTURE_IMAGES`` images) and with ``all_pictures=True``, alternating;
- suggest from the store.

Timers (process CPU time, steadier than wall time on a shared machine; wall time is recorded
too) around the functions that do the work split each run's time into: the model
(the members on the pixel features, ``predict_maps``; from images also the backbone,
``encoded_maps``), the outputs (``_write_image_outputs``: label maps, palette PNGs, overlays and
their drawing, ``render.overlay``, counted apart) and the rest (reading the store, decoding
images, the contact sheet, bookkeeping). Writes bench/results/throughput.json.

    python bench/throughput.py [--images 1000] [--work /tmp/ddpmseg-scale]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import scale  # noqa: E402  (bench/scale.py: the pool and the run)


class Timers:
    """Seconds spent inside wrapped functions, by label (nested calls counted once each)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, owner, attr: str, label: str, stack: contextlib.ExitStack) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.process_time() - start
        setattr(owner, attr, timed)
        stack.callback(setattr, owner, attr, original)


def one_run(kind: str, fn, timers: Timers, n: int) -> dict:
    from ddpmseg.outputs import render
    from ddpmseg.pipelines import predict as prediction
    from ddpmseg.pipelines import suggest as suggestion

    timers.seconds.clear()
    with contextlib.ExitStack() as stack:
        timers.wrap(prediction, "predict_maps", "model", stack)
        timers.wrap(suggestion, "predict_maps", "model", stack)
        timers.wrap(prediction, "encoded_maps", "backbone", stack)
        timers.wrap(prediction, "_write_image_outputs", "outputs", stack)
        timers.wrap(render, "overlay", "overlay drawing", stack)
        start, wall = time.process_time(), time.perf_counter()
        fn()
        total, wall = time.process_time() - start, time.perf_counter() - wall
    t = dict(timers.seconds)
    model = t.get("model", 0.0) + t.get("backbone", 0.0)
    outputs = t.get("outputs", 0.0)
    row = {"run": kind, "images": n, "wall_s": round(wall, 2), "cpu_s": round(total, 2),
           "images_per_cpu_s": round(n / total, 2),
           "model_s": round(model, 2), "of_which_backbone_s": round(t.get("backbone", 0.0), 2),
           "outputs_s": round(outputs, 2),
           "of_which_overlay_drawing_s": round(t.get("overlay drawing", 0.0), 2),
           "rest_s": round(total - model - outputs, 2),
           "outside_model_share": round(1 - model / total, 3)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/ddpmseg-scale")
    ap.add_argument("--picture-images", type=int, default=None,
                    help="predict's default pictured images (PICTURE_IMAGES) for this run, "
                         "e.g. 10 on a 100-image pool to keep the 1,000-image pool's 10 %%")
    args = ap.parse_args()
    import torch

    from ddpmseg.pipelines import predict as prediction
    from ddpmseg.pipelines.predict import predict
    from ddpmseg.pipelines.suggest import suggest

    if args.picture_images is not None:
        prediction.PICTURE_IMAGES = args.picture_images

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "commands.log", "a") as log:
        run = scale.fitted_run(work, 10, log)
    base = work / f"pool{args.images}"
    pool = scale.make_pool(base / "images", args.images)
    store = base / "pool.zarr"
    if not store.exists():
        subprocess.run(scale.DDPMSEG + ["--no-progress", "extract", str(pool), str(store),
                                        "--checkpoint", "bundled:faces_64", "--num-classes",
                                        str(scale.NUM_CLASSES), "--threads", "1"], check=True)
    n = len(list(pool.glob("*.png")))
    out = work / "throughput"
    timers, rows = Timers(), []
    runs = [
        ("predict, store, default pictures", lambda: predict(
            run, store, out / "a", images=str(pool), progress=False, device="cpu")),
        ("predict, store, all pictures", lambda: predict(
            run, store, out / "b", images=str(pool), progress=False, device="cpu",
            all_pictures=True)),
        ("predict, images, default pictures", lambda: predict(
            run, pool, out / "c", progress=False, device="cpu")),
        ("predict, images, all pictures", lambda: predict(
            run, pool, out / "d", progress=False, device="cpu", all_pictures=True)),
        ("suggest, store", lambda: suggest(run, store, out / "s", images=str(pool),
                                           device="cpu")),
    ]
    for kind, fn in runs:
        rows.append(one_run(kind, fn, timers, n))
        shutil.rmtree(out, ignore_errors=True)
    result = {"bench": "bench/throughput.py", "images": n, "image_size": scale.SIZE,
              "picture_images": prediction.PICTURE_IMAGES, "ensemble": 10,
              "backbone": "bundled:faces_64 (default steps, blocks)", "threads": 1,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                         "cores, shared with other jobs (timings noisy)",
              "runs": rows}
    (HERE / "results" / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""How fast a 650-image HTML report opens in headless Chromium: lazy card pictures (as
`ddpmseg report` writes them) against the same page with every picture loaded eagerly.

A synthetic prediction folder of N images (default 650, ade_bedroom_30's test set) at 256 px,
30 classes, with uncertainty maps, is reported once (`ddpmseg.report`); the page is then opened
from file:// R times each way (the baseline: the same index.html with its loading="lazy"
attributes removed), in alternation. Measured per open: milliseconds from navigation start
to the load event (the page is usable, the browser's spinner stops) and how many pictures had
been fetched by then. Chromium and chromedriver from Debian, one tab, 1280 x 800.

    python bench/report_open.py [--images 650] [--repeats 5]

Writes bench/results/report_open.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = (256, 256)
CLASSES = 30


def make_predictions(folder: Path, count: int) -> None:
    """``count`` label maps of blocky random classes, with entropy and JSD maps."""
    from ddpmseg.outputs import render

    rng = np.random.default_rng(0)
    palette = render.make_palette(CLASSES, 255)
    names = [f"im{k:04d}" for k in range(count)]
    for name in names:
        cells = rng.integers(0, CLASSES, (16, 16)).astype(np.uint8)
        labels = np.kron(cells, np.ones((16, 16), np.uint8))
        np.save(folder / f"{name}.npy", labels)
        render.save_label_png(folder / f"{name}.png", labels, palette)
        np.save(folder / f"{name}_entropy.npy", rng.random(SIZE, np.float32))
        np.save(folder / f"{name}_jsd.npy", rng.random(SIZE, np.float32) * 0.3)
    (folder / "predict.json").write_text(json.dumps({
        "input_kind": "store", "num_members": 3, "num_classes": CLASSES, "ignore_label": 255,
        "class_names": [f"class {c}" for c in range(CLASSES)], "image_size": list(SIZE),
        "uncertainty": True, "names": names, "num_images": count}))


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def open_once(driver, index: Path) -> tuple[float, int]:
    """(ms from navigation start to the load event, pictures fetched by then)."""
    driver.get("about:blank")
    driver.get(index.resolve().as_uri())
    return driver.execute_script(
        "const t = performance.getEntriesByType('navigation')[0];"
        "return [t.loadEventEnd - t.startTime, Array.from(document.images)"
        ".filter(i => i.complete && i.naturalWidth > 0).length];")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=650)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ddpmseg.outputs.report import report

    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred"
        pred.mkdir()
        make_predictions(pred, args.images)
        lazy = report(pred)
        eager = lazy.with_name("eager.html")
        eager.write_text(lazy.read_text().replace(' loading="lazy"', ""))
        pictures = lazy.read_text().count("<img ")
        driver = browser()
        try:
            runs = {"lazy": [], "eager": []}
            for _ in range(args.repeats):
                for kind, page in (("lazy", lazy), ("eager", eager)):
                    runs[kind].append(open_once(driver, page))
        finally:
            driver.quit()
    figures = {kind: {"load_ms_median": statistics.median(ms for ms, _ in r),
                      "load_ms": [round(ms, 1) for ms, _ in r],
                      "pictures_loaded_at_load": r[-1][1]} for kind, r in runs.items()}
    result = {
        "images": args.images, "pictures_on_page": pictures, "repeats": args.repeats,
        "lazy": figures["lazy"], "eager_baseline": figures["eager"],
        "speedup": figures["eager"]["load_ms_median"] / figures["lazy"]["load_ms_median"],
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report_open.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.images}-image report ({pictures} pictures), median of {args.repeats} opens: "
          f"lazy {figures['lazy']['load_ms_median']:.0f} ms to load "
          f"({figures['lazy']['pictures_loaded_at_load']} pictures fetched), eager baseline "
          f"{figures['eager']['load_ms_median']:.0f} ms "
          f"({figures['eager']['pictures_loaded_at_load']}): {result['speedup']:.1f}x; "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={result['threads']}, {platform.machine()}")


if __name__ == "__main__":
    main()

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

With ``--pages``: the report of a large folder (default 10,000 images at 64 px; 50 distinct
predictions, copied for the rest, which costs the page nothing) as `ddpmseg report` writes it,
cards in pages (index.html), against the baseline of the same report with every card on one
page (single.html: the cards of every page put into index.html). Both lazy. Goal: < 2 s to the
load event. Writes bench/results/report_open_pages.json.

    python bench/report_open.py --pages [--images 10000] [--size 64] [--repeats 3]
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
DISTINCT = 50   # --pages: distinct predictions; the others are copies of these


def make_predictions(folder: Path, count: int, side: int = SIZE[0],
                     distinct: int | None = None) -> None:
    """``count`` label maps of blocky random classes, with entropy and JSD maps; with
    ``distinct``, only that many are made and the rest copied from them."""
    from ddpmseg.outputs import render

    rng = np.random.default_rng(0)
    palette = render.make_palette(CLASSES, 255)
    names = [f"im{k:05d}" for k in range(count)]
    size = (side, side)
    for k, name in enumerate(names):
        if distinct and k >= distinct:
            for suffix in (".npy", ".png", "_entropy.npy", "_jsd.npy"):
                shutil.copyfile(folder / f"{names[k % distinct]}{suffix}",
                                folder / f"{name}{suffix}")
            continue
        cells = rng.integers(0, CLASSES, (16, 16)).astype(np.uint8)
        labels = np.kron(cells, np.ones((side // 16, side // 16), np.uint8))
        np.save(folder / f"{name}.npy", labels)
        render.save_label_png(folder / f"{name}.png", labels, palette)
        np.save(folder / f"{name}_entropy.npy", rng.random(size, np.float32))
        np.save(folder / f"{name}_jsd.npy", rng.random(size, np.float32) * 0.3)
    (folder / "predict.json").write_text(json.dumps({
        "input_kind": "store", "num_members": 3, "num_classes": CLASSES, "ignore_label": 255,
        "class_names": [f"class {c}" for c in range(CLASSES)], "image_size": list(size),
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
    parser.add_argument("--pages", action="store_true",
                        help="paged cards against one page (default 10,000 images at 64 px)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=90, help="--pages: s per page load")
    args = parser.parse_args()
    if args.pages:
        return pages_main(args)
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


def single_page(index: Path) -> Path:
    """The baseline: index.html with the cards of every page in place of the first page's."""
    import re

    text = index.read_text()
    pages = [index] + sorted(index.parent.glob("images-*.html"),
                             key=lambda p: int(p.stem.split("-")[1]))
    cards = "".join(c for p in pages
                    for c in re.findall(r'<article class="card".*?</article>', p.read_text(),
                                        flags=re.S))
    start = text.index('<nav class="pager"')
    end = text.rindex("</nav>", 0, text.index("</section>")) + len("</nav>")
    single = index.with_name("single.html")
    single.write_text(text[:start] + cards + text[end:])
    return single


def pages_main(args) -> None:
    import time

    from ddpmseg.outputs.report import CARDS_PER_PAGE, report

    from selenium.common.exceptions import TimeoutException

    count = args.images if args.images != 650 else 10_000
    side = args.size or 64
    # Kept between runs (the report of 10,000 images takes minutes to write).
    pred = Path(tempfile.gettempdir()) / f"ddpmseg-report-open-{count}-{side}" / "pred"
    report_s = None
    if not (pred / "report" / "index.html").is_file():
        shutil.rmtree(pred.parent, ignore_errors=True)
        pred.mkdir(parents=True)
        make_predictions(pred, count, side, DISTINCT)
        start = time.perf_counter()
        report(pred)
        report_s = round(time.perf_counter() - start, 1)
    paged = pred / "report" / "index.html"
    single = single_page(paged)
    driver = browser()
    driver.set_page_load_timeout(args.timeout)
    runs = {"paged": [], "single": []}
    try:
        # The baseline last, alternating would leave a timed-out load in the way.
        for kind, page in (("paged", paged), ("single", single)):
            for _ in range(args.repeats):
                try:
                    runs[kind].append(open_once(driver, page))
                except TimeoutException:
                    runs[kind].append((None, 0))
                    break
    finally:
        driver.quit()
    sizes = {"paged": paged.stat().st_size, "single": single.stat().st_size}
    figures = {}
    for kind, r in runs.items():
        ms = [m for m, _ in r]
        done = [m for m in ms if m is not None]
        figures[kind] = {"load_ms": [None if m is None else round(m, 1) for m in ms],
                         "load_ms_median": statistics.median(done) if len(done) == len(ms)
                         else None, "timeout_s": args.timeout, "html_bytes": sizes[kind]}
    result = {
        "images": count, "image_size": side, "cards_per_page": CARDS_PER_PAGE,
        "repeats": args.repeats, "report_s": round(report_s, 1),
        "paged": figures["paged"], "single_page_baseline": figures["single"],
        "speedup": (figures["single"]["load_ms_median"] or args.timeout * 1000)
        / figures["paged"]["load_ms_median"],
        "speedup_note": "a lower bound where the baseline timed out",
        "goal_ms": 2000, "machine": f"{platform.platform()}, shared with other jobs",
        "cpu_count": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report_open_pages.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{count}-image report, opens: paged {figures['paged']['load_ms']} ms, one page "
          f"{figures['single']['load_ms']} ms (None: over {args.timeout} s): "
          f">= {result['speedup']:.1f}x")


if __name__ == "__main__":
    main()

"""The report in a real browser: Debian's chromium, driven by selenium through Debian's
chromedriver (nothing downloads a browser). Loads the page from file://, with no console error,
every picture decoded, one table row per class, sorting by IoU reordering the table, and the
mIoU, the table's first rows and the first card on screen at 1280 x 800.

Without chromium the tests skip, saying why, except under CI (CI=true), where they fail: CI
must run them (.ci/run installs chromium when it is missing).
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ddpmseg.outputs import render
from tests.helpers import chromium
from ddpmseg.outputs.report import report

VIEWPORT = (1280, 800)


pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    driver = chromium(*VIEWPORT)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


def _iou_column(driver) -> list[float]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#class-table tbody tr'))"
        ".map(r => parseFloat(r.cells[2].getAttribute('data-v')))")


_IMAGE_STATES = ("return Array.from(document.images).map(i => [i.getAttribute('src'), "
                 "i.complete, i.naturalWidth])")

# Brings every picture on screen in turn (card pictures load lazily) and waits for each to
# load or fail; then back to the top.
_LOAD_ALL = """
const done = arguments[arguments.length - 1];
(async () => {
  for (const img of Array.from(document.images)) {
    img.scrollIntoView();
    if (!img.complete) {
      await new Promise(r => { img.addEventListener("load", r, {once: true});
                               img.addEventListener("error", r, {once: true});
                               setTimeout(r, 5000); });
    }
  }
  window.scrollTo(0, 0);
  done(true);
})();
"""


def open_page(driver, index) -> list:
    """Load ``index`` from file://; returns the pictures' [src, complete, naturalWidth] as
    the page opened, before anything was scrolled."""
    driver.get(index.resolve().as_uri())
    driver.execute_script("return document.readyState")  # get() returns after the load event
    return driver.execute_script(_IMAGE_STATES)


def check_page(driver, index, num_classes: int) -> list[str]:
    """Load ``index`` from file:// and return what is wrong with it (empty when all is well)."""
    open_page(driver, index)
    driver.set_script_timeout(120)
    driver.execute_async_script(_LOAD_ALL)
    problems = [f"console: {e['message']}" for e in driver.get_log("browser")
                if e["level"] in ("SEVERE", "ERROR")]
    images = driver.execute_script(_IMAGE_STATES)
    if not images:
        problems.append("no <img> on the page")
    problems += [f"image {src} not shown (naturalWidth {w})" for src, done, w in images
                 if not done or w == 0]
    rows = driver.execute_script(
        "return document.querySelectorAll('#class-table tbody tr').length")
    if rows != num_classes:
        problems.append(f"class table has {rows} rows, expected {num_classes}")
        return problems
    before = _iou_column(driver)
    driver.execute_script(
        "document.querySelectorAll('#class-table th')[2].querySelector('button').click()")
    after = _iou_column(driver)
    if after != sorted(before, reverse=True) or after == before:
        problems.append(f"sorting by IoU gave {after} from {before}")
    return problems


def test_report_in_chromium(browser, pred_folder, tmp_path):
    built = report(pred_folder.pred, pred_folder.gt)
    # The report is a folder that works wherever it is copied.
    copy = tmp_path / "copied report"
    shutil.copytree(built.parent, copy)
    assert check_page(browser, copy / "index.html", pred_folder.num_classes) == []
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size == VIEWPORT
    # Without scrolling: the mIoU, the table's first rows and the whole first card.
    bottoms = browser.execute_script(
        "return ['#miou', '#class-table tbody tr:nth-child(3)', '.card'].map("
        "s => document.querySelector(s).getBoundingClientRect().bottom)")
    assert all(0 < b <= VIEWPORT[1] for b in bottoms), bottoms


def test_the_check_fails_on_a_missing_image(browser, pred_folder):
    index = report(pred_folder.pred, pred_folder.gt)
    (index.parent / "img" / "0001_overlay.png").unlink()
    problems = check_page(browser, index, pred_folder.num_classes)
    assert any("0001_overlay.png not shown" in p for p in problems), problems
    assert any(p.startswith("console:") and "0001_overlay.png" in p for p in problems)


def test_the_check_fails_on_an_empty_table(browser, pred_folder):
    index = report(pred_folder.pred, pred_folder.gt)
    page = index.read_text()
    start, end = page.index("<tbody>") + len("<tbody>"), page.index("</tbody>")
    index.write_text(page[:start] + page[end:])
    problems = check_page(browser, index, pred_folder.num_classes)
    assert problems == [f"class table has 0 rows, expected {pred_folder.num_classes}"]


def test_a_long_report_lists_every_class_and_loads_pictures_lazily(browser, tmp_path):
    """80 cards; the first image has 20 classes (more than fit beside its overlay): all 20 are
    listed, largest first, in a box that scrolls to its last entry. Card pictures carry
    loading="lazy": on opening, the first card's are shown and the last card's not loaded;
    scrolled to, they load."""
    pred, num_classes, count = tmp_path / "pred", 24, 80
    pred.mkdir()
    palette = render.make_palette(num_classes, 255)
    names = [f"im{k:03d}" for k in range(count)]
    for k, name in enumerate(names):
        labels = np.zeros((20, 30), np.uint8)
        if k == 0:  # class c covers 30 - c pixels: classes 0..19 present, 0 the largest
            labels.ravel()[:sum(30 - c for c in range(20))] = np.repeat(
                np.arange(20), [30 - c for c in range(20)])
        else:
            labels[:, k % 30:] = k % num_classes
        np.save(pred / f"{name}.npy", labels)
        render.save_label_png(pred / f"{name}.png", labels, palette)
    class_names = [f"class {c}" for c in range(num_classes)]
    (pred / "predict.json").write_text(json.dumps({
        "input_kind": "store", "num_members": 3, "num_classes": num_classes,
        "ignore_label": 255, "class_names": class_names, "image_size": [20, 30],
        "names": names, "num_images": count}))
    index = report(pred)
    first = open_page(browser, index)
    cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('.card img')).map(i => i.loading)")
    assert len(cards) == 2 * count and set(cards) == {"lazy"}   # prediction, overlay
    loaded = {src: done and width > 0 for src, done, width in first}
    assert loaded["img/0000_overlay.png"] and loaded["img/0000_pred.png"]
    assert not loaded[f"img/{count - 1:04d}_overlay.png"]
    assert sum(loaded.values()) < count   # far fewer than the 160 card pictures
    # The 20-class card: every class listed, largest first, and the list scrolls to the end.
    legend = browser.execute_script("""
        const ul = document.querySelector('#card-0 ul.legend');
        const last = ul.lastElementChild;
        const before = last.getBoundingClientRect().bottom > ul.getBoundingClientRect().bottom;
        ul.scrollTop = ul.scrollHeight;
        return {items: Array.from(ul.children).map(li => li.textContent.trim()),
                caption: ul.parentElement.querySelector('figcaption').textContent,
                hiddenBefore: before, overflow: getComputedStyle(ul).overflowY,
                lastVisible: last.getBoundingClientRect().bottom
                             <= ul.getBoundingClientRect().bottom + 0.5};""")
    assert legend["items"] == [render.class_label(c, class_names) for c in range(20)]
    assert legend["caption"] == "20 classes"
    assert legend["hiddenBefore"] and legend["overflow"] == "auto" and legend["lastVisible"]
    # Scrolled to, every picture loads, the last card's too.
    browser.set_script_timeout(120)
    browser.execute_async_script(_LOAD_ALL)
    states = browser.execute_script(_IMAGE_STATES)
    assert len(states) == 2 * count and all(done and width > 0 for _, done, width in states)


def test_paged_cards_in_chromium(browser, pred_folder, monkeypatch):
    """With cards in pages: the pager leads to the next page, whose pictures all show, and a
    "label these next" link opens the page holding its card, scrolled to it."""
    from ddpmseg.outputs import report as reporting

    monkeypatch.setattr(reporting, "CARDS_PER_PAGE", 2)
    index = report(pred_folder.pred, pred_folder.gt)
    open_page(browser, index)
    assert browser.execute_script("return document.querySelectorAll('.card').length") == 2
    browser.execute_script("document.querySelector('nav.pager a').click()")
    assert browser.current_url.endswith("images-2.html#images")
    driver_cards = browser.execute_script(
        "return Array.from(document.querySelectorAll('.card')).map(c => c.id)")
    last = pred_folder.iou_order[2]
    assert driver_cards == [f"card-{pred_folder.names.index(last)}"]
    browser.set_script_timeout(60)
    browser.execute_async_script(_LOAD_ALL)
    states = browser.execute_script(_IMAGE_STATES)
    assert states and all(done and w > 0 for _, done, w in states), states
    open_page(browser, index)
    link = browser.execute_script(
        "return Array.from(document.querySelectorAll('#next a'))"
        f".find(a => a.getAttribute('href').startsWith('images-2')).getAttribute('href')")
    browser.execute_script(f"document.querySelector('#next a[href=\"{link}\"]').click()")
    top = browser.execute_script(
        f"return document.getElementById('{link.split('#')[1]}').getBoundingClientRect().top")
    assert browser.current_url.endswith(link) and 0 <= top < VIEWPORT[1]

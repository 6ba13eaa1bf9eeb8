"""``ddpmseg report``: one static HTML page of a prediction folder.

``report(PRED_DIR, gt=GT_DIR)`` writes ``index.html`` and the pictures it shows into one folder
(default ``PRED_DIR/report``): no CDN, no server, no absolute path, so it opens from ``file://``
and can be copied or zipped as a folder. The page shows the run (backbone and its fingerprint,
steps, blocks, members, vote, ETF), the mIoU with a sortable per-class table and the confusion
heat map (with ground truth), one card per image (image | prediction | overlay | uncertainty;
worst IoU first with ground truth, most uncertain first without) and "label these next": the
images whose ensemble members disagree most (mean Jensen-Shannon divergence).

Every text that comes from a config, a file name or a class name is HTML-escaped; pictures are
named by position (``img/0003_overlay.png``), never by the image's name.

Cards come in pages of ``CARDS_PER_PAGE``: index.html holds the first (and everything else:
settings, the whole class table, the confusion matrix, "label these next"); ``images-2.html``,
``images-3.html``, ... the next ones, each linked from a pager on every page. A page's DOM
stays the same size whatever the folder's, so a report of 10,000 images opens as fast as one
of 200.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ddpmseg.core.errors import BadInputError, InputNotFoundError, OutputError
from ddpmseg.core.fileio import atomic_write
from ddpmseg.core.locking import writer_lock
from ddpmseg.data import find_image, load_image, read_mask, resize_mask
from ddpmseg.outputs import folder, render
from ddpmseg.outputs.evaluate import confusion_axis, evaluate
from ddpmseg.outputs.folder import REPORT_DIR, check_complete, list_predictions
from ddpmseg.outputs.suggestions import read_suggestions

log = logging.getLogger(__name__)

__all__ = ["report", "REPORT_DIR", "LABEL_NEXT"]

LABEL_NEXT = 8            # images listed under "label these next"
IMAGE_THUMB = 512         # originals larger than this are shrunk for the page
_OWN_PICTURE = re.compile(r"^\d{4,}_(image|pred|overlay|entropy|jsd)\.png$")
CARDS_PER_PAGE = 200      # cards per HTML page
_OWN_PAGE = re.compile(r"^images-\d+\.html$")


@dataclass
class _Card:
    position: int
    name: str
    iou: float | None = None
    entropy: float | None = None
    jsd: float | None = None
    pictures: dict = field(default_factory=dict)   # kind -> file name under img/
    legend: list = field(default_factory=list)     # (label, rgb) of the classes present


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _read_meta(pred_dir: Path) -> dict:
    path = pred_dir / folder.META_FILE
    meta = check_complete(pred_dir)  # refuses a folder a killed predict left
    if not isinstance(meta.get("num_classes"), int):
        raise BadInputError(f"{path} has no num_classes",
                            "rerun `ddpmseg predict` to write it again")
    return meta


def _image_folders(meta: dict, gt_dir: Path | None) -> list[Path]:
    """Where the originals may be: predict's --images, its image-folder input, the masks."""
    folders = []
    if meta.get("images"):
        folders.append(Path(meta["images"]))
    if meta.get("input_kind") == "images" and meta.get("input"):
        folders.append(Path(meta["input"]))
    if gt_dir is not None:
        folders.append(gt_dir)
    return [f for f in folders if f.is_dir()]


def _original(folders: list[Path], name: str, max_image_pixels: int | None = None
              ) -> np.ndarray | None:
    for images in folders:
        path = find_image(images, name)
        if path is not None:
            return load_image(path, max_image_pixels=max_image_pixels)
    return None


def report(pred_dir, gt=None, out=None, *, label_next: int = LABEL_NEXT,
           resize: bool = False, max_image_pixels: int | None = None) -> Path:
    """Write the HTML report of the predictions in ``pred_dir`` (a ``ddpmseg predict`` folder)
    into ``out`` (default ``pred_dir/report``); with ``gt``, a folder of ground-truth masks,
    it shows the mIoU, per-class IoU, confusion matrix and per-image IoU too. Everything is
    checked before the first file is written. Images and PNG masks of more than
    ``max_image_pixels`` pixels (default PIL's limit) are refused. Returns the path of
    ``index.html``.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputNotFoundError(f"predictions folder {pred_dir} does not exist",
                                 "give the folder `ddpmseg predict` wrote")
    out_dir = Path(out) if out is not None else pred_dir / REPORT_DIR
    # Read under the prediction folder's lock (never half a rewrite by a predict); the report
    # folder needs its own lock only when it lies outside the prediction folder.
    with contextlib.ExitStack() as locks:
        locks.enter_context(writer_lock(pred_dir, "prediction folder"))
        if pred_dir.absolute() not in out_dir.absolute().parents:
            locks.enter_context(writer_lock(out_dir, "report folder"))
        return _report(pred_dir, gt, out_dir, label_next, resize, max_image_pixels)


def _report(pred_dir: Path, gt, out_dir: Path, label_next: int, resize: bool,
            max_image_pixels: int | None) -> Path:
    meta = _read_meta(pred_dir)
    predictions = list_predictions(pred_dir)
    if not predictions:
        raise InputNotFoundError(f"no predictions (<name>.npy or label PNGs) in {pred_dir}",
                                 "run `ddpmseg predict` first")
    gt_dir = Path(gt) if gt is not None else None
    # evaluate validates every mask (presence, size, labels) before anything is written.
    # ``resize``: as `evaluate --resize`, masks of another size are resized to the predictions.
    metrics = evaluate(pred_dir, gt_dir, confusion=True, write=False, resize=resize,
                       lock=False, max_image_pixels=max_image_pixels) if gt_dir else None
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder", "choose another `out=DIR`")
    page = _Page(pred_dir, meta, gt_dir, metrics, out_dir, label_next, max_image_pixels)
    try:
        return _write(page, predictions)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write the report into {out_dir} ({exc})",
                          "check the folder's permissions and free space, or choose another "
                          "`out=DIR`"
                          ) from exc


@dataclass(frozen=True)
class _Page:
    """What one report shows, and where it goes."""
    pred_dir: Path
    meta: dict
    gt_dir: Path | None
    metrics: dict | None
    out_dir: Path
    label_next: int
    max_image_pixels: int | None

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def ignore_label(self) -> int:
        return int(self.meta.get("ignore_label", 255))

    @property
    def class_names(self) -> tuple[str, ...]:
        return render.class_names(self.meta.get("class_names"))


def _write(page: _Page, predictions: dict) -> Path:
    meta, out_dir, metrics = page.meta, page.out_dir, page.metrics
    members = int(meta.get("num_members") or 0)
    palette = render.make_palette(page.num_classes, page.ignore_label)
    limits = render.uncertainty_limits(page.num_classes, max(members, 2))
    img_dir = out_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.iterdir():  # pictures of an earlier report of this folder
        if _OWN_PICTURE.match(old.name):
            old.unlink()
    cards, counts = _cards(page, predictions, palette, limits, img_dir)
    confusion_png = out_dir / folder.CONFUSION_PNG
    if metrics is not None:
        rows = metrics["classes"]
        labels = metrics["confusion"]["labels"]
        axis = confusion_axis(labels, page.class_names, page.ignore_label)
        render.confusion_image(np.asarray(metrics["confusion"]["matrix"]), axis, axis).save(
            confusion_png)
        cards.sort(key=lambda c: (c.iou, c.position))               # worst first
    else:
        rows = [{"index": c, "name": render.class_name(page.class_names, c), "iou": None,
                 "gt_pixels": None, "pred_pixels": int(counts[c])}
                for c in range(page.num_classes) if c != page.ignore_label]
        if confusion_png.is_file():  # stale: of an earlier report with ground truth
            confusion_png.unlink()
        cards.sort(key=lambda c: (-(c.entropy if c.entropy is not None else -1.0), c.position))

    pages = _paginate(cards)
    _write_pages(page, pages, limits)
    text = _page(page.pred_dir, meta, metrics, rows, palette, pages, page.label_next, limits)
    index = out_dir / folder.REPORT_INDEX
    atomic_write(index, lambda p: p.write_text(text, encoding="utf-8"))
    log.info("report of %d image(s) in %s%s", len(cards), index,
             f" (and {len(pages) - 1} more page(s) of cards)" if len(pages) > 1 else "")
    return index


def _paginate(cards: list[_Card]) -> list[list[_Card]]:
    """The cards, in order, in pages of ``CARDS_PER_PAGE`` (one page, maybe empty, at least)."""
    return [cards[k:k + CARDS_PER_PAGE] for k in range(0, len(cards), CARDS_PER_PAGE)] or [[]]


def page_file(number: int) -> str:
    """The HTML file of page ``number`` (1: index.html)."""
    return folder.REPORT_INDEX if number == 1 else f"images-{number}.html"


def _write_pages(page: _Page, pages: list[list[_Card]], limits) -> None:
    """images-2.html, ...: the cards after the first page's; stale pages removed."""
    for old in page.out_dir.iterdir():
        if _OWN_PAGE.match(old.name) and int(old.name[7:-5]) > len(pages):
            old.unlink()
    title = f"ddpmseg report: {page.pred_dir.resolve().name}"
    for number, cards in enumerate(pages[1:], 2):
        text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_esc(title)}: images, page {number}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{_esc(title)}</h1><nav><a href="index.html">run, classes and label these next</a>
</nav></header>
<section class="wide" id="images">{_cards_html(pages, number, limits)}</section>
</body></html>
"""
        target = page.out_dir / page_file(number)
        atomic_write(target, lambda p, t=text: p.write_text(t, encoding="utf-8"))


def _pager(pages: list[list[_Card]], current: int) -> str:
    """Links to every page of cards (none with one page)."""
    if len(pages) < 2:
        return ""
    links, first = [], 1
    for number, cards in enumerate(pages, 1):
        span = f"{first}&ndash;{first + len(cards) - 1}"
        first += len(cards)
        links.append(f'<b aria-current="page">{span}</b>' if number == current else
                     f'<a href="{page_file(number)}#images">{span}</a>')
    return f'<nav class="pager" aria-label="pages of images">{" ".join(links)}</nav>'


def _cards_html(pages: list[list[_Card]], number: int, limits) -> str:
    """Page ``number``'s cards between two pagers."""
    pager = _pager(pages, number)
    return pager + "".join(_card(c, limits) for c in pages[number - 1]) + pager


def _card_link(pages: list[list[_Card]], position: int) -> str:
    """The address of card ``position`` from index.html."""
    for number, cards in enumerate(pages, 1):
        if any(c.position == position for c in cards):
            return f"{'' if number == 1 else page_file(number)}#card-{position}"
    return f"#card-{position}"


def _cards(page: _Page, predictions: dict, palette: np.ndarray, limits, img_dir: Path
           ) -> tuple[list[_Card], np.ndarray]:
    """One card per prediction, its pictures written into ``img_dir``; and the pixel count of
    each label over all predictions."""
    folders = _image_folders(page.meta, page.gt_dir)
    counts = np.zeros(256, dtype=np.int64)
    cards = []
    for position, (name, path) in enumerate(predictions.items()):
        labels = read_mask(path, page.max_image_pixels)
        counts += np.bincount(labels.ravel(), minlength=256)
        card = _Card(position, name)
        if page.metrics is not None:
            card.iou = page.metrics["per_image"][name]
        image = _original(folders, name, page.max_image_pixels)
        stem = f"{position:04d}"
        shown = None  # (H, W) the pictures take: the image's aspect
        if image is not None:
            thumb = Image.fromarray(image)
            thumb.thumbnail((IMAGE_THUMB, IMAGE_THUMB))
            thumb.save(img_dir / f"{stem}_image.png")
            card.pictures["image"] = f"{stem}_image.png"
            if labels.shape != image.shape[:2]:  # a prediction at the model's size
                shown = (thumb.size[1], thumb.size[0])
                labels = resize_mask(labels, shown)
        render.save_label_png(img_dir / f"{stem}_pred.png", labels, palette)
        card.pictures["pred"] = f"{stem}_pred.png"
        # On the page the legend is HTML text beside the picture: it stays legible at
        # thumbnail size, where the PNG's legend panel would not.
        over = render.overlay(image, labels, palette, legend=False,
                              min_side=render.UNCERTAINTY_MIN_SIDE)
        Image.fromarray(over).save(img_dir / f"{stem}_overlay.png")
        card.pictures["overlay"] = f"{stem}_overlay.png"
        card.legend = render.legend_entries(np.bincount(labels.ravel(), minlength=256), palette,
                                            page.class_names, page.num_classes)
        _uncertainty_pictures(card, folder.uncertainty_maps(page.pred_dir, name), limits,
                              img_dir / stem, shown)
        cards.append(card)
    return cards, counts


def _uncertainty_pictures(card: _Card, maps: tuple[Path, Path] | None, limits,
                          stem: Path, shown: tuple[int, int] | None = None) -> None:
    """The card's mean entropy and JSD, and their heat maps (``<stem>_entropy.png``, ...),
    at ``shown`` (H, W) when given (the image's aspect)."""
    if maps is None:
        return
    entropy, jsd = np.load(maps[0]), np.load(maps[1])
    card.entropy, card.jsd = float(entropy.mean()), float(jsd.mean())
    for kind, values, (vmax, _) in zip(("entropy", "jsd"), (entropy, jsd), limits):
        heat = Image.fromarray(render.heatmap(values, vmax))
        if shown is not None:
            heat = heat.resize((shown[1], shown[0]), Image.BILINEAR)
        heat.save(f"{stem}_{kind}.png")
        card.pictures[kind] = f"{stem.name}_{kind}.png"


# -- the page --------------------------------------------------------------------------------
_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;
 background:#f4f5f7}
header{background:#fff;border-bottom:1px solid #dcdfe4;padding:10px 24px}
h1{font-size:18px;margin:0 0 4px}
h2{font-size:16px;margin:0 0 8px}
nav a{margin-right:14px;font-size:13px}
.settings{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;color:#333;margin:4px 0}
.settings b{font-weight:600;color:#000}
details{font-size:12px}
main{display:grid;grid-template-columns:380px minmax(0,1fr);gap:20px;padding:14px 24px}
.panel{background:#fff;border:1px solid #dcdfe4;border-radius:6px;padding:10px 12px;
 margin-bottom:14px}
.miou{font-size:30px;font-weight:700;line-height:1.1}
.sub{font-size:12.5px;color:#555}
.tablebox{max-height:calc(100vh - 330px);min-height:180px;overflow:auto}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th{position:sticky;top:0;background:#eef0f3;text-align:left;padding:0}
th button{all:unset;cursor:pointer;display:block;padding:4px 5px;font-weight:600;
 white-space:nowrap}
th button:focus-visible{outline:2px solid #2563eb}
th[aria-sort=descending] button::after{content:" \\25BC"}
th[aria-sort=ascending] button::after{content:" \\25B2"}
td{padding:3px 5px;border-top:1px solid #eceef1;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.name{max-width:130px;overflow:hidden;text-overflow:ellipsis}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #555;vertical-align:middle}
.card{background:#fff;border:1px solid #dcdfe4;border-radius:6px;padding:8px 10px;
 margin-bottom:14px}
.card h3{font-size:14px;margin:0 0 6px;word-break:break-all}
.card h3 span{font-weight:400;color:#555;font-size:12.5px;margin-left:10px}
.pics{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:12px;color:#555}
.pics img{height:120px;width:auto;display:block}
.pics img.labels{image-rendering:pixelated}
ul.legend{list-style:none;margin:0;padding:0;width:140px;height:120px;overflow:auto;
 font-size:11.5px;line-height:1.25}
ul.legend .sw{width:10px;height:10px}
.bar{height:8px;width:120px;border:1px solid #555;margin-top:3px}
.ticks{display:flex;justify-content:space-between;width:120px;font-size:11px;color:#333}
.none{height:120px;width:120px;display:flex;align-items:center;justify-content:center;
 background:#eee;color:#666;font-size:12px;text-align:center;padding:6px}
ol.next{margin:0;padding-left:22px;font-size:12.5px}
.confusion img{max-width:100%;height:auto}
section.wide{padding:0 24px 24px}
nav.pager{display:flex;flex-wrap:wrap;gap:4px 10px;font-size:12.5px;margin:0 0 12px}
"""

# Sorts the class table by the clicked column: numbers largest first, text A to Z; a second
# click reverses. Rows carry their sort keys in data-v, so displayed text never matters.
_JS = """
(function () {
  var table = document.getElementById("class-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var heads = table.querySelectorAll("th");
  heads.forEach(function (th, col) {
    var button = th.querySelector("button");
    if (!button) { return; }
    button.addEventListener("click", function () {
      var numeric = th.getAttribute("data-type") === "num";
      var now = th.getAttribute("aria-sort");
      var desc = now === "none" || now === null ? numeric : now === "ascending";
      heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
        var d;
        if (numeric) { d = parseFloat(x) - parseFloat(y); }
        else { d = x < y ? -1 : (x > y ? 1 : 0); }
        if (desc) { d = -d; }
        return d !== 0 ? d : parseInt(a.getAttribute("data-index"), 10) -
          parseInt(b.getAttribute("data-index"), 10);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""


def _fmt_pct(v: float | None) -> str:
    return "&ndash;" if v is None else f"{100 * v:.2f}"


def _fmt_int(v: int | None) -> str:
    return "&ndash;" if v is None else f"{v:,}"


def _settings(meta: dict) -> str:
    cfg = meta.get("config") or {}
    model, classifier = cfg.get("model") or {}, cfg.get("classifier") or {}
    fingerprint = meta.get("fingerprint") or {}
    sha = str(fingerprint.get("sha256") or "")
    backbone = model.get("preset") or "not recorded"
    checkpoint = model.get("checkpoint") or meta.get("checkpoint") or ""
    etf = (f"{classifier['etf']} (weight {classifier.get('etf_weight')})"
           if classifier.get("etf") else "not recorded")
    items = [
        ("backbone", f"{backbone}" + (f" ({checkpoint})" if checkpoint else "")),
        ("fingerprint", f"sha256 {sha[:12]}" if sha else "none"),
        ("steps", ", ".join(str(s) for s in meta.get("steps") or []) or "?"),
        ("blocks", ", ".join(str(b) for b in meta.get("blocks") or []) or "?"),
        ("members", meta.get("num_members", "?")),
        ("vote", meta.get("vote", "?")),
        ("ETF", etf),
        ("model input", "x".join(str(s) for s in meta.get("image_size") or []) or "?"),
        ("classes", meta.get("num_classes")),
    ]
    chips = "".join(f'<span><b>{_esc(k)}</b> {_esc(v)}</span>' for k, v in items)
    flags = fingerprint.get("flags") or {}
    detail = ""
    if flags or meta.get("input"):
        lines = "".join(f"<li>{_esc(k)}: {_esc(json.dumps(v))}</li>" for k, v in
                        sorted(flags.items()))
        detail = (f"<details><summary>backbone flags, input and output</summary>"
                  f"<div>sha256 {_esc(sha)}</div><div>input: {_esc(meta.get('input', ''))} "
                  f"({_esc(meta.get('input_kind', ''))})</div><ul>{lines}</ul></details>")
    return f'<div class="settings">{chips}</div>{detail}'


def _class_table(rows: list[dict], palette: np.ndarray, with_gt: bool) -> str:
    head = ('<thead><tr><th data-type="num" aria-sort="ascending"><button type="button">#'
            '</button></th><th data-type="text" aria-sort="none"><button '
            'type="button">class</button></th><th data-type="num" aria-sort="none"><button '
            'type="button">IoU %</button></th><th data-type="num" aria-sort="none"><button '
            'type="button">gt px</button></th><th data-type="num" aria-sort="none"><button '
            'type="button">pred px</button></th></tr></thead>')
    body = []
    for r in rows:
        c = int(r["index"])
        rgb = ",".join(str(int(v)) for v in palette[c])
        name = render.display_name(r["name"])
        iou = r["iou"] if with_gt else None
        body.append(
            f'<tr data-index="{c}"><td class="num" data-v="{c}">{c}</td>'
            f'<td class="name" data-v="{_esc(name.lower())}" title="{_esc(name)}">'
            f'<span class="sw" style="background:rgb({rgb})"></span> {_esc(name)}</td>'
            f'<td class="num" data-v="{-1 if iou is None else iou:.6f}">{_fmt_pct(iou)}</td>'
            f'<td class="num" data-v="{r["gt_pixels"] or 0}">{_fmt_int(r["gt_pixels"])}</td>'
            f'<td class="num" data-v="{r["pred_pixels"]}">{_fmt_int(r["pred_pixels"])}</td>'
            "</tr>")
    return f'<table id="class-table">{head}<tbody>{"".join(body)}</tbody></table>'


def _img(file: str, alt: str, pixelated: bool = False) -> str:
    cls = ' class="labels"' if pixelated else ""
    # lazy: a card's pictures load as it nears the screen, so a 650-image report opens fast.
    return f'<img src="img/{file}"{cls} loading="lazy" alt="{_esc(alt)}">'


def _figure(caption: str, inner: str) -> str:
    return f"<figure><figcaption>{_esc(caption)}</figcaption>{inner}</figure>"


def _none(text: str) -> str:
    return f'<div class="none">{_esc(text)}</div>'


def _gradient() -> str:
    stops = ", ".join(f"rgb({int(r)},{int(g)},{int(b)})" for r, g, b in render.HEAT_ANCHORS)
    return f"linear-gradient(to right, {stops})"


def _heat(card: _Card, kind: str, caption: str, limit: tuple[float, str]) -> str:
    vmax, note = limit
    bar = (f'<div class="bar" style="background:{_gradient()}"></div><div class="ticks">'
           f'<span>0</span><span>{_esc(render.format_number(vmax))} {_esc(note)}</span></div>')
    return _figure(caption, _img(card.pictures[kind], f"{caption} of {card.name}", True) + bar)


def _card(card: _Card, limits) -> str:
    facts = []
    if card.iou is not None:
        facts.append(f"IoU {100 * card.iou:.1f} %")
    if card.entropy is not None:
        facts.append(f"mean entropy {card.entropy:.3f}, mean JSD {card.jsd:.3f} nats")
    image = card.pictures.get("image")
    # Every class present, largest first, in a box as tall as the pictures that scrolls when
    # they do not fit (tabindex: keyboard users can scroll it too).
    items = "".join(f'<li><span class="sw" style="background:rgb({",".join(map(str, rgb))})">'
                    f"</span> {_esc(label)}</li>" for label, rgb in card.legend)
    count = f"{len(card.legend)} class{'es' if len(card.legend) != 1 else ''}"
    pics = [
        _figure("image", _img(image, f"image {card.name}") if image else
                _none("original not found (predict --images DIR)")),
        _figure("prediction", _img(card.pictures["pred"], f"prediction of {card.name}", True)),
        _figure("overlay", _img(card.pictures["overlay"], f"overlay of {card.name}")),
        _figure(count, f'<ul class="legend" tabindex="0" aria-label="{count} in the '
                       f'prediction">{items}</ul>'),
    ]
    if "entropy" in card.pictures:
        pics.append(_heat(card, "entropy", "uncertainty: entropy", limits[0]))
        pics.append(_heat(card, "jsd", "members' JSD", limits[1]))
    else:
        pics.append(_figure("uncertainty", _none("none: predict with --uncertainty")))
    return (f'<article class="card" id="card-{card.position}"><h3>{_esc(card.name)}'
            f'<span>{_esc("; ".join(facts))}</span></h3><div class="pics">{"".join(pics)}'
            "</div></article>")


def _label_next(pages: list[list[_Card]], count: int, suggested=None) -> str:
    cards = [c for p in pages for c in p]
    if suggested:  # `ddpmseg suggest --out PRED_DIR` wrote suggest.csv here: its ranking wins
        position = {c.name: c.position for c in cards}
        items = "".join(
            (f'<li><a href="{_card_link(pages, position[name])}">{_esc(name)}</a> '
             if name in position
             else f"<li>{_esc(name)} ") + f'<span class="sub">{_esc(kind)} {score:.4f}</span>'
            "</li>" for name, kind, score in suggested[:count])
        return ('<p class="sub">Ranked by <code>ddpmseg suggest</code> (suggest.csv): '
                f'highest ensemble disagreement first:</p><ol class="next">{items}</ol>')
    scored = [c for c in cards if c.jsd is not None]
    if not scored:
        return ('<p class="sub">No uncertainty maps in this folder: predict with '
                '--uncertainty to rank images by ensemble disagreement.</p>')
    scored.sort(key=lambda c: (-c.jsd, c.position))
    items = "".join(f'<li><a href="{_card_link(pages, c.position)}">{_esc(c.name)}</a> '
                    f'<span class="sub">JSD {c.jsd:.4f}</span></li>' for c in scored[:count])
    return ('<p class="sub">Highest mean disagreement between the ensemble\'s members '
            f'(Jensen-Shannon divergence):</p><ol class="next">{items}</ol>')


def _page(pred_dir: Path, meta: dict, metrics: dict | None, rows: list[dict],
          palette: np.ndarray, pages: list[list[_Card]], label_next: int, limits) -> str:
    cards = [c for p in pages for c in p]
    title = f"ddpmseg report: {pred_dir.resolve().name}"
    if metrics is not None:
        score = (f'<div class="miou" id="miou">mIoU {100 * metrics["miou"]:.2f} %</div>'
                 f'<div class="sub">over {metrics["evaluated_classes"]} classes and '
                 f'{metrics["num_images"]} images; ground truth {_esc(metrics["gt_dir"])}'
                 "</div>")
        order = "worst IoU first"
        confusion = ('<section class="wide" id="confusion"><div class="panel confusion">'
                     '<h2>Confusion matrix</h2><img src="confusion.png" alt="confusion matrix, '
                     'rows ground truth, columns prediction, row-normalised"></div></section>')
    else:
        score = ('<div class="miou" id="miou">mIoU &ndash;</div><div class="sub">no ground '
                 'truth given: pass --gt GT_DIR for IoU and the confusion matrix</div>')
        order = "most uncertain first" if any(c.entropy is not None for c in cards) \
            else "in name order"
        confusion = ""
    nav = ('<nav><a href="#classes">classes</a><a href="#images">images</a>'
           '<a href="#next">label these next</a>'
           + ('<a href="#confusion">confusion matrix</a>' if metrics is not None else "")
           + "</nav>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_esc(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{_esc(title)}</h1>{_settings(meta)}{nav}</header>
<main>
<aside>
<div class="panel" id="classes">{score}</div>
<div class="panel"><h2>Classes</h2><div class="tablebox">
{_class_table(rows, palette, metrics is not None)}</div></div>
<div class="panel" id="next"><h2>Label these next</h2>{_label_next(pages, label_next, read_suggestions(pred_dir))}</div>
</aside>
<section id="images"><h2>Images ({len(cards)}, {order})</h2>
{_cards_html(pages, 1, limits)}
</section>
</main>
{confusion}
<script>{_JS}</script>
</body></html>
"""

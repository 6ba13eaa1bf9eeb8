"""`ddpmseg.report`: the page's content, order, escaping and self-containedness (the browser
test checks how it renders)."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from ddpmseg.outputs import render
from ddpmseg.cli.main import cli
from ddpmseg.core.errors import BadInputError, InputNotFoundError
from ddpmseg.outputs.evaluate import evaluate
from ddpmseg.outputs.report import report


def card_order(page: str) -> list[str]:
    return re.findall(r'<article class="card" id="card-\d+"><h3>(.*?)<span>', page)


def esc(name: str) -> str:
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_report_with_ground_truth(pred_folder):
    index = report(pred_folder.pred, pred_folder.gt)
    assert index == pred_folder.pred / "report" / "index.html"
    page = index.read_text()
    metrics = evaluate(pred_folder.pred, pred_folder.gt, write=False)
    assert f"mIoU {100 * metrics['miou']:.2f} %" in page
    # One table row per class, with its IoU and pixel counts.
    rows = re.findall(r'<tr data-index="(\d+)">(.*?)</tr>', page)
    assert [int(i) for i, _ in rows] == list(range(pred_folder.num_classes))
    for (i, row), cls in zip(rows, metrics["classes"]):
        assert f"{100 * cls['iou']:.2f}<" in row and f">{cls['gt_pixels']:,}<" in row
        rgb = ",".join(str(int(v)) for v in render.make_palette(4, 255)[int(i)])
        assert f"background:rgb({rgb})" in row
    # Cards: worst image IoU first; "label these next": highest mean JSD first.
    assert card_order(page) == [esc(n) for n in pred_folder.iou_order]
    nxt = page[page.index('id="next"'):]
    listed = re.findall(r'<li><a href="#card-\d+">(.*?)</a>', nxt)
    assert listed == [esc(n) for n in pred_folder.jsd_order]
    assert (index.parent / "confusion.png").is_file()
    # The run's settings.
    for text in ("faces_64", "sha256 abababababab", "50, 150", "5, 6", "shared (weight 0.4)",
                 "<b>members</b>", "soft"):
        assert text in page, text


def test_every_text_is_escaped_and_the_page_self_contained(pred_folder, tmp_path):
    page = report(pred_folder.pred, pred_folder.gt, tmp_path / "r").read_text()
    assert page.count("<script") == 1                      # ours; the class name is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "cat &amp; dog" in page and "say &quot;hi&quot;" in page
    assert "&lt;i&gt;" in page and "<i>" not in page
    assert "&lt;ckpt&gt;.pt" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    # Every picture is a relative path to a file in the report's folder; nothing remote.
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 * 5 + 1                       # 5 pictures per card + confusion
    for src in sources:
        assert not re.match(r"^([a-z]+:|/)", src) and (tmp_path / "r" / src).is_file(), src
    assert "http" not in page.replace("http-equiv", "")


def test_report_without_ground_truth_orders_by_uncertainty(pred_folder):
    page = report(pred_folder.pred).read_text()
    assert card_order(page) == [esc(n) for n in pred_folder.entropy_order]
    assert "no ground truth given" in page and "confusion.png" not in page
    rows = re.findall(r'<tr data-index="(\d+)">(.*?)</tr>', page)
    counts = sum(np.bincount(np.load(pred_folder.pred / f"{n}.npy").ravel(), minlength=4)
                 for n in pred_folder.names)
    for i, row in rows:
        assert f'data-v="{counts[int(i)]}">{counts[int(i)]:,}<' in row


def test_a_second_report_replaces_the_first(pred_folder):
    report(pred_folder.pred, pred_folder.gt)
    (pred_folder.pred / "q&a.npy").unlink()
    meta = json.loads((pred_folder.pred / "predict.json").read_text())
    meta["names"].remove("q&a")
    (pred_folder.pred / "predict.json").write_text(json.dumps(meta))
    index = report(pred_folder.pred)
    assert len(card_order(index.read_text())) == 2
    assert len(list((index.parent / "img").glob("*_pred.png"))) == 2
    assert not (index.parent / "confusion.png").exists()


def test_bad_input_is_refused_before_anything_is_written(pred_folder, tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        report(tmp_path / "nowhere")
    (pred_folder.gt / "plain.npy").unlink()
    with pytest.raises(BadInputError, match="no ground truth for prediction 'plain'"):
        report(pred_folder.pred, pred_folder.gt)
    assert not (pred_folder.pred / "report").exists()
    (pred_folder.pred / "predict.json").unlink()
    with pytest.raises(InputNotFoundError, match="predict.json"):
        report(pred_folder.pred)


def test_report_command_prints_the_index_path(pred_folder, tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(cli, ["report", str(pred_folder.pred), "--gt",
                                      str(pred_folder.gt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "index.html")
    assert (out / "index.html").is_file()
    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert missing.output.startswith("error: predictions folder") and "Traceback" not in \
        missing.output



def test_cards_come_in_pages_and_label_next_links_across_them(pred_folder, monkeypatch):
    from ddpmseg.outputs import report as reporting

    monkeypatch.setattr(reporting, "CARDS_PER_PAGE", 2)
    index = report(pred_folder.pred, pred_folder.gt)
    first, second = index.read_text(), (index.parent / "images-2.html").read_text()
    order = [esc(n) for n in pred_folder.iou_order]
    assert card_order(first) == order[:2] and card_order(second) == order[2:]
    # The class table whole on the first page only; a pager on both, the current page bold.
    assert first.count("<tr data-index=") == pred_folder.num_classes
    assert "class-table" not in second and 'href="index.html"' in second
    assert '<b aria-current="page">1&ndash;2</b>' in first
    assert '<a href="images-2.html#images">3&ndash;3</a>' in first
    assert '<a href="index.html#images">1&ndash;2</a>' in second
    # "label these next" links each card where it is.
    nxt = first[first.index('id="next"'):]
    links = dict((n, h) for h, n in re.findall(r'<li><a href="([^"]+)">(.*?)</a>', nxt))
    last = pred_folder.iou_order[2]
    assert links[esc(last)] == f"images-2.html#card-{pred_folder.names.index(last)}"
    assert all(h.startswith("#card-") for n, h in links.items() if n != esc(last))
    # A later report with one page removes the stale second page.
    monkeypatch.setattr(reporting, "CARDS_PER_PAGE", 200)
    report(pred_folder.pred, pred_folder.gt)
    assert not (index.parent / "images-2.html").exists()
    assert "pager" not in index.read_text().split("<style>")[1].split("</style>")[1]

"""Evaluation checks that kill mutants the older tests let through (bench/mutation.py)."""

import numpy as np
import pytest

from ddpmseg.evaluate import (confusion_axis, confusion_matrix, format_table, image_iou,
                              iou_from_confusion)


def row(index, name, iou, gt, pred, inter, union):
    return {"index": index, "name": name, "iou": iou, "gt_pixels": gt, "pred_pixels": pred,
            "intersection": inter, "union": union}


def test_the_table_layout():
    # Names are at least 5 and at most 40 wide (longer ones end in ".."); number columns are
    # one wider than the longest union, at least 9.
    result = {"classes": [row(0, "background", 0.5, 10, 12, 6, 16),
                          row(7, "a" * 45, 0.0, 1234567890, 0, 0, 1234567890)],
              "miou": 0.25, "num_images": 3, "ignore_label": 255, "mask_ignore": True}
    rule = "-" * 107
    assert format_table(result).splitlines() == [
        " idx  " + "class".ljust(40) + "  " + "IoU %".rjust(7) + "  " + "gt px".rjust(11)
        + "  " + "pred px".rjust(11) + "  " + "inter".rjust(11) + "  " + "union".rjust(11),
        rule,
        "   0  " + "background".ljust(40) + "  " + "50.00".rjust(7) + "  " + "10".rjust(11)
        + "  " + "12".rjust(11) + "  " + "6".rjust(11) + "  " + "16".rjust(11),
        "   7  " + "a" * 38 + "..     0.00   1234567890            0            0   1234567890",
        rule,
        "mIoU 25.00 % over 2 classes, 3 images (ignore label 255: masked out)"]


def test_the_table_of_a_short_result():
    result = {"classes": [row(1, "cat", 1 / 3, 1, 2, 1, 2)], "miou": 1 / 3}
    assert format_table(result).splitlines() == [
        " idx  class    IoU %      gt px    pred px      inter      union",
        "-" * 64,
        "   1  cat      33.33          1          2          1          2",
        "-" * 64,
        "mIoU 33.33 % over 1 classes, ? images (ignore label None: not masked (reference))"]


def test_iou_rows_by_hand():
    # gt\pred counts over classes 0..2 and the ignore label 3 (inside the matrix).
    conf = np.zeros((256, 256), dtype=np.int64)
    conf[0, 0], conf[0, 1], conf[1, 1], conf[1, 0], conf[2, 1] = 5, 1, 2, 3, 4
    conf[3, 0], conf[3, 2] = 7, 2
    rows, miou = iou_from_confusion(conf, 4, ignore_label=3)
    # class 0: inter 5, gt 6, pred 5 + 3 + 7 = 15, union 16; class 1: 2 / (5 + 7 - 2);
    # class 2: 0 / (4 + 2); class 3 is the ignore label: no row.
    assert [(r["index"], r["intersection"], r["gt_pixels"], r["pred_pixels"], r["union"])
            for r in rows] == [(0, 5, 6, 15, 16), (1, 2, 5, 7, 10), (2, 0, 4, 2, 6)]
    assert miou == pytest.approx((5 / 16 + 2 / 10 + 0) / 3)
    rows, miou = iou_from_confusion(conf, 4, ignore_label=3, mask_ignore=True)
    # The ignore label's gt row is dropped: class 0 loses 7 predicted pixels, class 2 two.
    assert [(r["pred_pixels"], r["union"]) for r in rows] == [(8, 9), (7, 10), (0, 4)]
    assert miou == pytest.approx((5 / 9 + 2 / 10 + 0) / 3)
    # The input is not changed by masking.
    assert conf[3, 0] == 7
    # An ignore label outside the matrix masks nothing.
    assert iou_from_confusion(conf, 3, ignore_label=300, mask_ignore=True)[1] == \
        pytest.approx(iou_from_confusion(conf, 3, ignore_label=300)[1])


def test_an_image_iou_counts_only_its_classes():
    pred = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    gt = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    conf = confusion_matrix(pred, gt)
    # class 0: 1 / 2; class 1: 2 / 3; class 2 absent from both: left out, not counted as 0.
    assert image_iou(conf, 3, ignore_label=255) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert image_iou(np.zeros((256, 256), np.int64), 3, ignore_label=255) == 0.0


def test_confusion_axis_names_the_ignore_label():
    assert confusion_axis([0, 1, 255], ["sky", "road"], 255) == ["0 sky", "1 road", "255 ignore"]

"""``ddpmseg report``: a prediction folder -> a static HTML page (index.html + pictures)."""

from __future__ import annotations

import click

from ddpmseg.cli.common import max_pixels_option


@click.command("report")
@click.argument("pred_dir", metavar="PRED_DIR")
@click.option("--gt", "gt_dir", default=None, metavar="GT_DIR",
              help="Folder of ground-truth masks (or a store with labels): adds mIoU, "
                   "per-class and per-image IoU and the confusion matrix.")
@click.option("--resize", is_flag=True,
              help="Resize masks of another size to the predictions' (nearest), as "
                   "`evaluate --resize`.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where index.html and its pictures go. [default: PRED_DIR/report]")
@max_pixels_option
def command(pred_dir, gt_dir, resize, out_dir, max_image_pixels):
    """Write a self-contained HTML report of the predictions in PRED_DIR and print the path of
    its index.html. It opens from file:// without a server and copies as a folder.

    \b
    Examples:
      ddpmseg report preds/ffhq34 --gt data/ffhq_34/real/test
      ddpmseg report preds/mine --out report-mine
      ddpmseg report preds/horse64 --gt data/test --resize
    """
    from ddpmseg.outputs.report import report

    click.echo(report(pred_dir, gt_dir, out_dir, resize=resize,
                      max_image_pixels=max_image_pixels))

"""``ddpmseg evaluate``: predictions + ground truth -> per-class IoU table and mIoU."""

from __future__ import annotations

import click

from ddpmseg.cli.common import (
    config_option,
    ignore_label_option,
    max_pixels_option,
    num_classes_option,
    resolve_config,
)


@click.command("evaluate")
@click.argument("pred_dir", metavar="PRED_DIR")
@click.argument("gt_dir", metavar="[GT_DIR]", required=False)
@config_option
@num_classes_option
@ignore_label_option
@max_pixels_option
@click.option("--mask-ignore", is_flag=True,
              help="Drop ground-truth ignore pixels before counting (stricter than the "
                   "reference, which counts predictions there in the class's union).")
@click.option("--resize", is_flag=True,
              help="Resize masks of another size to their prediction's (nearest neighbour). "
                   "Not needed for predictions at their images' own size (predict's default); "
                   "for those made with --at-model-size.")
@click.option("--confusion", is_flag=True, help="Also write confusion.csv and confusion.png.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where metrics.json goes. [default: PRED_DIR]")
def command(pred_dir, gt_dir, config_path, num_classes, ignore_label, mask_ignore, resize,
            confusion, out_dir, max_image_pixels):
    """Per-class IoU and mIoU of the predictions in PRED_DIR against the masks in GT_DIR.

    Predictions <name>.npy are matched by name with <name>.npy (or grey/palette PNG) masks;
    GT_DIR may also be a feature store, whose labels are then the ground truth.
    The mIoU is the reference's: summed over the whole test set, ignore label left out of the
    mean but its pixels not masked. Classes come from --config, else from PRED_DIR/predict.json;
    --num-classes and --ignore-label override both. Classes other than those predict.json (or
    a GT store) records are refused: another data set's config would score its classes.
    Without GT_DIR, the config's data.test_dir is used (a reference ddpm.json's testing_path).

    \b
    Examples:
      ddpmseg evaluate preds/ffhq34 data/ffhq_34/real/test --config ffhq_34
      ddpmseg evaluate preds/mine masks/ --num-classes 5 --ignore-label 255 --confusion
      ddpmseg evaluate preds/horse data/test --config horse_21 --resize
      ddpmseg evaluate preds/horse stores/test.zarr
    """
    from ddpmseg.outputs.evaluate import evaluate, format_table

    class_names = ()
    classes_from = "--num-classes/--ignore-label"
    if config_path is not None:
        cfg = resolve_config(config_path, data={"num_classes": num_classes,
                                                "ignore_label": ignore_label})
        gt_dir = gt_dir or cfg.data.test_dir or None
        if cfg.data.names_classes:  # else the classes are predict.json's
            num_classes, ignore_label = cfg.data.num_classes, cfg.data.ignore_label
            class_names = cfg.data.class_names
            classes_from = f"config {cfg.data.name}"
    if gt_dir is None:
        raise click.UsageError("give GT_DIR, or a config with a test folder (data.test_dir, or "
                               "testing_path in a ddpm.json)")
    result = evaluate(pred_dir, gt_dir, num_classes=num_classes, ignore_label=ignore_label,
                      class_names=class_names, mask_ignore=mask_ignore, confusion=confusion,
                      out=out_dir, resize=resize, classes_from=classes_from,
                      max_image_pixels=max_image_pixels)
    click.echo(format_table(result))
    click.echo(f"wrote {result['metrics_path']}")

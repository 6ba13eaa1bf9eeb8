"""``ddpmseg predict``: a trained run + a feature store or images -> label maps and pictures."""

from __future__ import annotations

import click

from ddpmseg.config import VOTES
from ddpmseg.cli.common import (
    count,
    device_option,
    max_pixels_option,
    resize_option,
    scheduler_option,
    show_progress,
    threads_option,
)


@click.command("predict")
@click.argument("run", metavar="RUN")
@click.argument("input_path", metavar="INPUT")
@click.argument("out_dir", metavar="OUT")
@click.option("--vote", type=click.Choice(VOTES), default=None,
              help="How members are combined: soft = mean of probabilities, log = mean of "
                   "log-probabilities (the seed's), hard = majority. [default: the run's "
                   "config, soft]")
@click.option("--uncertainty", is_flag=True,
              help="Also write <name>_entropy.npy, <name>_jsd.npy and <name>_uncertainty.png.")
@click.option("--tile-rows", type=click.IntRange(min=1), default=None, metavar="N",
              help="Image rows predicted at a time; bounds peak memory. [default: the run's "
                   "config, 32]")
@click.option("--images", "images_dir", default=None, metavar="DIR",
              help="With a store as INPUT: folder of the original images, for the overlays "
                   "(drawn on grey without it).")
@max_pixels_option
@resize_option("images")
@click.option("--at-model-size", is_flag=True,
              help="Write masks and pictures at the model's size (the old output) instead of "
                   "each image's own size.")
@click.option("--checkpoint", default=None, metavar="PATH",
              help="The backbone checkpoint, when INPUT is an image folder and the run's is "
                   "elsewhere. Must be the one the run was trained with.")
@click.option("--all-pictures", is_flag=True,
              help="Draw an overlay (and uncertainty picture) for every image; by default "
                   "only the first 100 get them, label maps are written for all.")
@scheduler_option()
@click.option("--report", "with_report", is_flag=True,
              help="Also write OUT/report/index.html (see `ddpmseg report`) and print its path.")
@device_option
@threads_option()
@click.pass_context
def command(ctx, run, input_path, out_dir, vote, uncertainty, tile_rows, images_dir, resize,
            at_model_size, checkpoint, all_pictures, scheduler, with_report, device, threads,
            max_image_pixels):
    """Predict segmentation masks with the ensemble of RUN for every image of INPUT.

    INPUT is a feature store (from `ddpmseg extract`) or a folder of images; from images,
    features are extracted on the fly with the run's backbone. OUT receives per image
    <name>.npy (uint8 class indices), <name>.png (palette PNG), <name>_overlay.png (the first
    100 images; all with --all-pictures), and once palette.json, summary.png (contact sheet)
    and predict.json (the settings used). Masks and pictures are at each image's own size (the
    ensemble's mean probabilities resized, then the argmax); --at-model-size keeps them at the
    model's.

    \b
    Examples:
      ddpmseg predict runs/ffhq34 stores/ffhq34_test.zarr preds/ffhq34
      ddpmseg predict runs/ffhq34 data/ffhq_34/real/test preds/ffhq34 --uncertainty --report
      ddpmseg predict runs/ffhq34 stores/test.zarr preds --images data/test --vote hard
      ddpmseg predict runs/cats photos/ preds/cats --resize pad
    """
    from ddpmseg.pipelines.predict import predict

    summary = predict(run, input_path, out_dir, vote=vote, uncertainty=uncertainty,
                      device=device, tile_rows=tile_rows, resize=resize, checkpoint=checkpoint,
                      images=images_dir, progress=show_progress(ctx),
                      threads=threads, max_image_pixels=max_image_pixels,
                      all_pictures=all_pictures, scheduler=scheduler,
                      at_model_size=at_model_size)
    click.echo(f"predicted {count(summary['num_images'], 'image')} ({summary['input_kind']}, "
               f"vote {summary['vote']}, {count(summary['num_members'], 'member')}) into "
               f"{summary['out_dir']}")
    if with_report:
        from ddpmseg.outputs.report import report

        click.echo(report(summary["out_dir"], max_image_pixels=max_image_pixels))

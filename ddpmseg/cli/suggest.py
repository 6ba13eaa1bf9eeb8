"""``ddpmseg suggest``: rank unlabelled images by ensemble disagreement (label these next)."""

from __future__ import annotations

import click

from ddpmseg.outputs.suggestions import CSV_FILE, SCORES, SHEET_FILE
from ddpmseg.cli.common import (
    as_flags,
    device_option,
    max_pixels_option,
    scheduler_option,
    threads_option,
)


@click.command("suggest")
@click.argument("run", metavar="RUN")
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "out_dir", default="suggest", show_default=True, metavar="DIR",
              help=f"Folder for {CSV_FILE} and {SHEET_FILE}. A prediction folder: its HTML "
                   "report then lists these under \"label these next\".")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="K",
              help="List only the K best images. [default: all]")
@click.option("--by", type=click.Choice(SCORES), default="jsd", show_default=True,
              help="jsd: the members' Jensen-Shannon divergence (their disagreement); "
                   "entropy: the entropy of their mean (the ensemble's uncertainty).")
@click.option("--diverse", is_flag=True,
              help="Skip near-duplicates: greedy picks penalised by the cosine similarity of "
                   "the images' mean-pooled features to the picks before.")
@click.option("--include-labelled", is_flag=True,
              help="Rank labelled images too (those with a mask, or trained on by RUN), "
                   "which are left out by default.")
@click.option("--images", "images_dir", default=None, metavar="DIR",
              help="With a store as INPUT: folder of the original images, for the sheet.")
@click.option("--resize", is_flag=True,
              help="Resize images of another size to the run's image size.")
@click.option("--checkpoint", default=None, metavar="PATH",
              help="The backbone checkpoint, when INPUT is an image folder and the run's is "
                   "elsewhere.")
@device_option
@threads_option()
@max_pixels_option
@scheduler_option()
def command(run, input_path, out_dir, top, by, diverse, include_labelled, images_dir, resize,
            checkpoint, device, threads, max_image_pixels, scheduler):
    """Rank the images of INPUT (a feature store or a folder of unlabelled images) by how
    much the ensemble of RUN disagrees on them, most first: the images to label next.
    Labelled images (with a mask, or trained on by RUN) are left out unless
    --include-labelled; stderr says how many.

    Writes DIR/suggest.csv (rank, name, score, per-class predicted area) and
    DIR/suggest.png (contact sheet of the top 8); prints the ranking.

    \b
    Examples:
      ddpmseg suggest runs/ffhq34 data/unlabelled --top 5
      ddpmseg suggest runs/ffhq34 stores/pool.zarr --by entropy --diverse --out preds/ffhq34
    """

    from ddpmseg.pipelines.suggest import skipped_line, suggest

    ranked = suggest(run, input_path, out_dir, top=top, by=by, diverse=diverse, device=device,
                     checkpoint=checkpoint, resize=resize, images=images_dir,
                     include_labelled=include_labelled, threads=threads,
                     max_image_pixels=max_image_pixels, scheduler=scheduler)
    for k, s in enumerate(ranked, 1):
        click.echo(f"{k}\t{s.name}\t{s.score:.6f}")
    click.echo(as_flags(skipped_line(ranked.skipped)), err=True)  # how many the ranking leaves out

"""``ddpmseg sweep``: score each stored (step, block) map, then greedy combinations."""

from __future__ import annotations

import click

from ddpmseg.cli.common import parse_blocks, parse_ints, threads_option


@click.command("sweep")
@click.argument("train_store", metavar="TRAIN_STORE")
@click.argument("test_store", metavar="TEST_STORE")
@click.option("--out", "out_dir", default="sweep", show_default=True, metavar="DIR",
              help="Folder for sweep.csv, sweep.png (heat map), greedy.csv and sweep.json.")
@click.option("--pixels", type=click.IntRange(min=2), default=20000, show_default=True,
              metavar="N", help="Labelled training pixels in the fixed sample.")
@click.option("--test-pixels", type=click.IntRange(min=1), default=40000, show_default=True,
              metavar="N", help="Test pixels in the fixed sample the mIoU is computed on.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Classifiers trained per map set (seeds 0..N-1): mean +- std.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True,
              help="Epochs over the pixel sample per classifier.")
@click.option("--budget", type=click.IntRange(min=1), default=None, metavar="DIMS",
              help="Largest dims per pixel of a greedy selection. [default: no limit]")
@click.option("--candidates", type=click.IntRange(min=1), default=10, show_default=True,
              help="The best single maps that greedy selection chooses among.")
@click.option("--max-maps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Greedy rounds (maps in the largest selection).")
@click.option("--compare", multiple=True, metavar="STEPS:BLOCKS",
              help="A steps x blocks grid to score beside the sweep's choice, e.g. "
                   "50,150,250:2,4,5,7,8 (repeatable).")
@threads_option()
def command(train_store, test_store, out_dir, pixels, test_pixels, seeds, epochs, budget,
            candidates, max_maps, compare, threads):
    """Find the diffusion steps and decoder blocks worth training on, from a TRAIN_STORE and
    a TEST_STORE extracted with many steps and blocks.

    Each stored (step, block) map alone trains a small pixel classifier on a fixed sample of
    labelled pixels (test mIoU: steps x blocks table and heat map); then greedy forward
    selection adds maps while the mIoU rises, printing the mIoU-vs-dims curve and the
    [features] lines to use.

    \b
    Examples:
      ddpmseg extract data/ffhq_34/real/train stores/sweep_train.zarr --config faces64_ffhq_34 \\
          --steps 50,150,250,400,600 --blocks 0,1,2,3,4,5,6,7,8,9,10,11 --resize
      ddpmseg sweep stores/sweep_train.zarr stores/sweep_test.zarr --seeds 3 \\
          --compare 50,150,250:2,4,5,7,8
    """
    from ddpmseg.pipelines.sweep import SweepSettings, format_summary, sweep

    grids = []
    for text in compare:
        if ":" not in text:
            raise click.BadParameter(f"{text!r}: expected STEPS:BLOCKS", param_hint="--compare")
        steps, blocks = text.split(":", 1)
        grids.append((parse_ints(steps, "--compare"), parse_blocks(blocks)))
    settings = SweepSettings(pixels=pixels, test_pixels=test_pixels, seeds=seeds, epochs=epochs,
                             budget=budget, candidates=candidates, max_maps=max_maps)
    summary = sweep(train_store, test_store, out_dir, settings, compare=grids, threads=threads)
    click.echo(format_summary(summary))

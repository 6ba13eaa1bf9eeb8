"""``ddpmseg train-backbone``: a folder of images -> a trained ADM backbone checkpoint."""

from __future__ import annotations

import os

import click

from ddpmseg.cli.common import device_option, renamed_option, show_progress, threads_option


@click.command("train-backbone")
@click.argument("images_dir", metavar="IMAGES_DIR")
@click.argument("out_dir", metavar="OUT")
@click.option("--preset", default=None, metavar="NAME|JSON",
              help="Model flags: a preset (lsun_256, faces_64, tiny_256, tiny64_cosine) or a "
                   "JSON file of guided-diffusion flags (or {\"model_flags\": {...}}), as in "
                   "extract.")
@renamed_option("--flags", "--preset FILE", "preset")
@click.option("--iterations", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train until the run has made N optimiser iterations in all (a resumed run "
                   "counts its earlier ones).")
@renamed_option("--steps", "--iterations", "iterations", type=click.IntRange(min=1))
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="M", help="Train for M minutes of this call (with --iterations: whichever "
                                "comes first).")
@click.option("--images-per-iteration", type=click.IntRange(min=1), default=None, metavar="N",
              help="Images per optimiser iteration in all: under torchrun the global batch, "
                   "split evenly over the processes (a multiple of their number). [default: 16]")
@renamed_option("--batch-size", "--images-per-iteration", "images_per_iteration",
                type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4,
              show_default=True, help="AdamW learning rate.")
@click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True), default=0.9999,
              show_default=True, help="EMA decay of the weights saved to ema.pt.")
@device_option
@threads_option()
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT exactly where its last checkpoint left off (same "
                   "data order and random numbers). Flags may be omitted: OUT/flags.json.")
@click.option("--save-every-minutes", "save_every", type=click.FloatRange(min=0, min_open=True),
              default=10.0, show_default=True, metavar="M",
              help="Minutes between checkpoints (one is also written at the end).")
@click.option("--samples", type=click.IntRange(min=0), default=4, show_default=True,
              metavar="N", help="Images in OUT/samples.png at each checkpoint (0: none).")
@click.option("--sample-passes", type=click.IntRange(min=1), default=None, metavar="N",
              help="Denoising passes of the strided ancestral sampler that draws samples.png "
                   "(N of the diffusion steps, evenly spaced). [default: 50]")
@renamed_option("--sample-steps", "--sample-passes", "sample_passes", type=click.IntRange(min=1))
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def command(ctx, images_dir, out_dir, preset, iterations, minutes, images_per_iteration, lr, ema,
            device, threads, resume, save_every, samples, sample_passes, seed):
    """Train an ADM diffusion UNet on the images in IMAGES_DIR, writing checkpoints to OUT.

    The objective is guided-diffusion's: epsilon MSE at uniformly drawn diffusion steps, plus
    the variational bound on the learned variance (stop-gradient on the mean) when the flags set
    learn_sigma.
    AdamW, an EMA of the weights, random horizontal flips; images are resized and
    centre-cropped to the model's size.

    Multi-GPU (DDP): launch with torchrun; each process trains on its share of the global
    --images-per-iteration (cuda:LOCAL_RANK with nccl, or the CPU with gloo), and only the first one
    writes OUT and shows progress. Resume with the same number of processes to keep the
    random numbers exact (another number resumes the data order exactly).

    OUT gets ema.pt (load it with the same flags as any guided-diffusion checkpoint),
    model.pt, state.pt, flags.json, train_log.jsonl and samples.png.

    \b
    Examples:
      ddpmseg train-backbone faces/ runs/faces64 --preset faces_64 --minutes 60
      ddpmseg train-backbone faces/ runs/faces64 --resume --iterations 20000
      torchrun --nproc_per_node 4 $(which ddpmseg) train-backbone faces/ runs/f64 \\
          --preset faces_64 --images-per-iteration 64 --minutes 60
    """
    from ddpmseg.backbone.train import train_backbone

    if preset is None and not resume:
        raise click.UsageError("give the model flags: --preset NAME|JSON")
    if iterations is None and minutes is None:
        raise click.UsageError("say how long to train: --iterations N or --minutes M")
    # Not given: the library's defaults (one place: backbone.train.train_backbone).
    given = {k: v for k, v in (("images_per_iteration", images_per_iteration),
                               ("sample_passes", sample_passes)) if v is not None}
    out = train_backbone(images_dir, out_dir, preset, iterations=iterations, minutes=minutes,
                         lr=lr, ema=ema, device=device, resume=resume, save_every=save_every,
                         seed=seed, samples=samples, progress=show_progress(ctx),
                         threads=threads, **given)
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: the first process only
        click.echo(f"{out}: ema.pt, model.pt, state.pt, flags.json")

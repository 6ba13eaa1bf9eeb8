"""``ddpmseg extract``: a folder of images (+ masks) -> a feature store."""

from __future__ import annotations

import click

from .common import config_option, device_option, parse_ints, resolve_config

_DTYPES = ("float16", "bfloat16", "float32")
_PRECISIONS = ("fp32", "bf16", "fp16")


@click.command("extract")
@click.argument("data_dir", metavar="DATA_DIR")
@click.argument("store", metavar="STORE")
@config_option
@click.option("--checkpoint", default=None, metavar="PATH",
              help="The guided-diffusion checkpoint (.pt). [default: model.checkpoint of the "
                   "config]")
@click.option("--preset", default=None, metavar="NAME|JSON",
              help="Model flags: a preset (lsun_256, faces_64, ...) or a flags JSON file. "
                   "[default: model.preset of the config]")
@click.option("--steps", default=None, metavar="T,T,...",
              help="Diffusion steps to noise each image to. [default: config, 50,150,250]")
@click.option("--blocks", default=None, metavar="B,B,...",
              help="Decoder blocks whose outputs are kept. [default: config, 5,6,7,8,12]")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None,
              help="Storage dtype of the activations. [default: config, float16]")
@click.option("--codec", default=None, metavar="lossless|bitroundK",
              help="lossless, or bitroundK: keep K mantissa bits of each stored value (lossy, "
                   "relative error <= 2^-(K+1)); bitround3 halves a float16 store: 1/108 of "
                   "dense float32 for the 256px models (README). [default: config, lossless]")
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Images per forward pass. [default: config, 1]")
@click.option("--precision", type=click.Choice(_PRECISIONS), default=None,
              help="Compute precision of the model (fp16 on CUDA only). [default: config, fp32]")
@click.option("--seed", type=int, default=None, help="Noise seed. [default: config, 0]")
@click.option("--resize", is_flag=True,
              help="Resize images of another size to the model's (masks with nearest).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store made with other settings.")
@click.option("--scheduler", default=None, metavar="local|local:N|tcp://HOST:PORT",
              help="Run as dask.distributed tasks: a local cluster of N worker processes, or "
                   "an existing scheduler whose workers see the same files.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx, data_dir, store, config_path, checkpoint, preset, steps, blocks, dtype, codec,
            device, batch_size, precision, seed, resize, overwrite, scheduler, no_progress):
    """Extract diffusion features of every image in DATA_DIR into the store STORE.

    DATA_DIR holds images (png/jpg) with masks of the same stem (<id>.npy or <id>_mask.png)
    for training and evaluation, or images only for prediction. Every mask is checked before
    anything is written. Rerunning the same command resumes an interrupted extraction;
    a store made with other settings is refused unless --overwrite. Each option overrides
    its key of the config.

    \b
    Examples:
      ddpmseg extract data/ffhq_34/real/train stores/ffhq34_train.zarr \\
          --config ffhq_34 --checkpoint checkpoints/ffhq.pt
      ddpmseg extract my_images/ stores/mine.zarr --preset faces_64 \\
          --checkpoint adm_faces64.pt --steps 50,150,250 --blocks 2,4,5,7,8 --resize
    """
    from ..featcache import extract
    from ..featcache.store import codec_name

    cfg = resolve_config(config_path,
                         model={"preset": preset, "checkpoint": checkpoint},
                         features={"steps": parse_ints(steps, "--steps"),
                                   "blocks": parse_ints(blocks, "--blocks"),
                                   "dtype": dtype, "codec": codec, "seed": seed,
                                   "precision": precision, "batch_size": batch_size})
    quiet = bool(ctx.find_root().params.get("quiet"))
    result = extract(data_dir, store, cfg, device=device, resize=resize, overwrite=overwrite,
                     scheduler=scheduler, progress=not (no_progress or quiet))
    info = result.info
    lossless = info.codec.get("keepbits") is None
    click.echo(f"{store}: {len(result)} images, {info.feature_dim} dims per pixel "
               f"({len(info.steps)} steps x {len(info.blocks)} blocks), {info.dtype}"
               + ("" if lossless else f" {codec_name(info.codec)}") + ", "
               f"{'with' if info.has_labels else 'without'} labels")

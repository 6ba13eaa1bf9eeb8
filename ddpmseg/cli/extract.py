"""``ddpmseg extract``: a folder of images (+ masks) -> a feature store."""

from __future__ import annotations

import click

from ddpmseg.spec import PRECISIONS, STORE_DTYPES
from ddpmseg.cli.common import (
    config_option,
    device_option,
    ignore_label_option,
    max_pixels_option,
    resize_option,
    num_classes_option,
    parse_blocks,
    parse_ints,
    renamed_option,
    resolve_config,
    scheduler_option,
    show_progress,
    threads_option,
)


@click.command("extract")
@click.argument("paths", nargs=-1, required=True, metavar="[DATA_DIR] STORE")
@config_option
@click.option("--checkpoint", default=None, metavar="PATH",
              help="The backbone: a guided-diffusion checkpoint (.pt, with --preset), or a "
                   "diffusers model folder (DDPM UNet2DModel or Stable Diffusion). "
                   "[default: model.checkpoint of the config]")
@click.option("--preset", default=None, metavar="NAME|JSON",
              help="Model flags: a preset (lsun_256, faces_64, ...) or a flags JSON file. "
                   "[default: model.preset of the config]")
@click.option("--prompt", default=None, metavar="TEXT",
              help="Stable Diffusion only: the text the UNet is conditioned on. "
                   "[default: config, the empty prompt]")
@click.option("--steps", default=None, metavar="T,T,...",
              help="Diffusion steps to noise each image to. [default: config, 50,150,250]")
@click.option("--blocks", default=None, metavar="B,B,...",
              help="Decoder blocks whose outputs are kept: indices (of up_blocks for a "
                   "diffusers folder, which also takes names like up2.res1, up2.attn0). "
                   "[default: config, 5,6,7,8,12]")
@num_classes_option
@ignore_label_option
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default=None,
              help="Storage dtype of the activations. [default: config, float16]")
@click.option("--codec", default=None, metavar="lossless|bitroundK",
              help="lossless, or bitroundK: keep K mantissa bits of each stored value (lossy, "
                   "relative error <= 2^-(K+1)); bitround3 halves a float16 store: 1/108 of "
                   "dense float32 for the 256px models (README). [default: config, lossless]")
@device_option
@threads_option()
@click.option("--images-per-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Images per forward pass (features.images_per_batch). [default: config, 1]")
@renamed_option("--batch-size", "--images-per-batch", "images_per_batch",
                type=click.IntRange(min=1))
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Compute precision of the model (fp16 on CUDA only). [default: config, fp32]")
@click.option("--seed", type=int, default=None, help="Noise seed. [default: config, 0]")
@resize_option("images (and their masks)")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store made with other settings.")
@click.option("--prune", is_flag=True,
              help="Keep images that left DATA_DIR in the store as inactive (never trained "
                   "on) instead of refusing.")
@click.option("--compact", is_flag=True,
              help="Rewrite the store without its inactive images (implies --prune).")
@click.option("--repair", is_flag=True,
              help="Read every chunk of the images already extracted and re-extract exactly "
                   "the damaged ones (those `ddpmseg verify STORE` lists).")
@click.option("--images-per-shard", type=click.IntRange(min=0), default=64, show_default=True,
              metavar="N",
              help="A new store keeps N images' chunks of each array in one file (format 4); "
                   "0: one file per image per array (format 2). An existing store keeps its own.")
@max_pixels_option
@scheduler_option("Run", outcome="")
@click.pass_context
def command(ctx, paths, config_path, checkpoint, preset, prompt, steps, blocks, num_classes,
            ignore_label, dtype, codec, device, threads, images_per_batch, precision, seed, resize,
            overwrite, prune, compact, repair, images_per_shard, max_image_pixels, scheduler):
    """Extract diffusion features of every image in DATA_DIR into the store STORE.

    DATA_DIR holds images (png/jpg/webp/bmp/tif) with masks of the same stem (<id>.npy or <id>_mask.png)
    for training and evaluation, or images only for prediction. Every mask is checked before
    anything is written. Rerunning the same command resumes an interrupted extraction and
    follows the folder: new images are appended, a changed mask rewrites its labels, a
    changed image is re-extracted; images gone from the folder are refused unless --prune.
    A store made with other settings is refused unless --overwrite. Each option overrides
    its key of the config. Without DATA_DIR, the config's data.train_dir is used (a
    reference ddpm.json's training_path).

    \b
    Examples:
      ddpmseg extract data/ffhq_34/real/train stores/ffhq34_train.zarr \\
          --config ffhq_34 --checkpoint checkpoints/ffhq.pt
      ddpmseg extract my_images/ stores/mine.zarr --preset faces_64 \\
          --checkpoint adm_faces64.pt --steps 50,150,250 --blocks 2,4,5,7,8 --resize
      ddpmseg extract stores/train.zarr --config experiments/ffhq_34/ddpm.json
      ddpmseg extract data/ffhq_34/real/train stores/ffhq34_train.zarr \\
          --config ffhq_34 --checkpoint checkpoints/ffhq.pt --prune   # after labelling more
      ddpmseg extract data/ffhq_34/real/train stores/ffhq34_train.zarr \\
          --config ffhq_34 --checkpoint checkpoints/ffhq.pt --repair
      ddpmseg extract my_images/ stores/sd.zarr --checkpoint models/stable-diffusion-v1-5 \\
          --steps 50,150,250 --blocks 1,2,3 --resize --config ffhq_34
    """
    from ddpmseg.pipelines.extract import extract
    from ddpmseg.featcache.store import codec_name

    # The options as given: the library brings a bundled checkpoint's preset, a preset's
    # bundled checkpoint, the model's usual steps and blocks (pipelines.extract.resolve_model).
    cfg = resolve_config(config_path,
                         model={"prompt": prompt},
                         features={"steps": parse_ints(steps, "--steps"),
                                   "blocks": parse_blocks(blocks),
                                   "dtype": dtype, "codec": codec, "seed": seed,
                                   "precision": precision,
                                   "images_per_batch": images_per_batch},
                         data={"num_classes": num_classes, "ignore_label": ignore_label})
    data_dir, store = _data_and_store(paths, cfg.data.train_dir)
    result = extract(data_dir, store, cfg, checkpoint, preset=preset, device=device,
                     resize=resize, overwrite=overwrite, scheduler=scheduler,
                     progress=show_progress(ctx), prune=prune, compact=compact, repair=repair,
                     threads=threads, max_image_pixels=max_image_pixels,
                     images_per_shard=images_per_shard)
    info = result.info
    lossless = info.codec.get("keepbits") is None
    click.echo(f"{store}: {len(result)} images, {info.feature_dim} dims per pixel "
               f"({len(info.steps)} steps x {len(info.blocks)} blocks), {info.dtype}"
               + ("" if lossless else f" {codec_name(info.codec)}") + ", "
               f"{'with' if info.has_labels else 'without'} labels")


def _data_and_store(paths: tuple[str, ...], default_dir: str) -> tuple[str, str]:
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) == 1 and default_dir:
        return default_dir, paths[0]
    if len(paths) == 1:
        raise click.UsageError("give DATA_DIR STORE, or a config with a training folder "
                               "(data.train_dir, or training_path in a ddpm.json)")
    raise click.UsageError(f"expected [DATA_DIR] STORE, got {len(paths)} paths")

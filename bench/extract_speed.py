"""Feature extraction speed: ddpmseg's Backbone against the original code's way, interleaved.

The baseline does what the original does (yandex-research/ddpm-segmentation's
``FeatureExtractorDDPM`` over openai/guided-diffusion's ``UNetModel``) and nothing more, written
here from reading it: under ``torch.no_grad()``, for each step t one full UNet forward (every
decoder block and the ``out`` head) of the image noised to t, forward hooks on the chosen
``output_blocks`` keeping their outputs; then ``collect_features``: each map bilinearly
upsampled to the image size (align_corners=False), one ``torch.cat``. Ours is
``Backbone.activations``: the steps of ``--batch-images`` images as one batch under
``inference_mode``, stopping after the deepest requested block, native maps (what the store
keeps; nothing is upsampled).

Both run on the same model object in the same process, on the same images and noise. The
machine is shared, so the contenders alternate group by group (a group is --batch-images
images; the order flips every group) and the figure is the **median of the per-group ratios**
(baseline seconds / ours), each group's images timed back to back; the same with process CPU
seconds (all threads), which other jobs on the machine disturb less. Features: ours upsampled
the same way against the baseline's, max |difference| and that relative to max |feature|.

Models: ``lsun_256`` (the published 256px architecture, 553M parameters, random weights; real
bedroom_28 images when ../shared is there) and ``faces_64`` (the bundled trained checkpoint on
ffhq_34 images resized to 64 px).

    python bench/extract_speed.py [--models lsun_256,faces_64] [--groups 4] [--batch-images 1]
                                  [--threads 1] [--device cpu]

Prints one table and writes bench/results/extract_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ddpmseg.backbone import Backbone  # noqa: E402
from ddpmseg.core.device import resolve_device  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = {
    # name: (preset, checkpoint or None for random weights, image folder, steps, blocks)
    "lsun_256": ("lsun_256", None, SHARED / "bedroom_28" / "real" / "train",
                 (50, 150, 250), (5, 6, 7, 8, 12)),
    "faces_64": ("faces_64", "bundled:faces_64", SHARED / "ffhq_34" / "real" / "train",
                 (50, 150, 250), (2, 4, 5, 7, 8)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_images(folder: Path, n: int, size: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n, 3, size, size) in [-1, 1]: the folder's first n PNGs resized (bilinear), or noise."""
    from PIL import Image

    paths = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if len(paths) == n:
        arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size),
                                                                 Image.Resampling.BILINEAR))
                  for p in paths]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, f"{n} images of {folder.parent.parent.name}"
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1, f"{n} random images"


def upsample_concat(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """collect_features: each (1, C, h, w) map to ``size`` (bilinear, align_corners False),
    concatenated along channels -> (D, H, W)."""
    return torch.cat([F.interpolate(m, size=size, mode="bilinear")[0] for m in maps], dim=0)


def original_features(bb: Backbone, x0: torch.Tensor, steps, blocks, noise) -> torch.Tensor:
    """One image (1, 3, H, W) -> (D, H, W), the original extractor's way."""
    model, captured = bb.model, {}
    hooks = [model.output_blocks[b].register_forward_hook(
        lambda mod, args, out, b=b: captured.__setitem__(b, out.detach().float()))
        for b in blocks]
    maps = []
    try:
        with torch.no_grad():
            for t in steps:
                tt = torch.tensor([t]).to(x0.device)
                x_t = bb.schedule.q_sample(x0, tt, noise)
                model(x_t, tt)  # full forward, `out` included; its output is discarded
                maps.extend(captured.pop(b) for b in blocks)
            return upsample_concat(maps, tuple(x0.shape[-2:]))
    finally:
        for h in hooks:
            h.remove()


def ours(bb: Backbone, x0: torch.Tensor, steps, blocks, noise) -> dict:
    return bb.activations(x0, steps, blocks, noise=noise)


def diffs(acts: dict, refs: list[torch.Tensor], steps, blocks) -> tuple[float, float]:
    """(max |ours upsampled - original|, that / max |original|) over a group's images."""
    worst = scale = 0.0
    for i, ref in enumerate(refs):
        mine = upsample_concat([acts[(t, b)][i:i + 1] for t in steps for b in blocks],
                               tuple(ref.shape[-2:]))
        worst = max(worst, float((mine - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        del mine
    return worst, worst / scale


def bench_model(name: str, device: torch.device, args) -> dict:
    preset, checkpoint, folder, steps, blocks = MODELS[name]
    t0 = time.perf_counter()
    bb = (Backbone.from_checkpoint(checkpoint, preset, device=device) if checkpoint
          else Backbone.random(preset, seed=0, device=device))
    build_s = time.perf_counter() - t0
    size = bb.flags.image_size
    B = args.batch_images
    images, source = load_images(folder, args.groups * B + 1, size, args.seed)
    images = images.to(device)
    noise = bb.default_noise(size, size, seed=0)

    # Untimed warm-up on an image of its own: first calls per shape pick kernels.
    warm = images[-1:]
    ours(bb, warm.expand(B, -1, -1, -1).contiguous(), steps, blocks, noise)
    original_features(bb, warm, steps, blocks, noise)
    _sync(device)

    groups = []
    max_abs = max_rel = 0.0
    for g in range(args.groups):
        x = images[g * B:(g + 1) * B]
        timing, cpu, out = {}, {}, {}
        order = ("original", "ours") if g % 2 == 0 else ("ours", "original")
        for who in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if who == "ours":
                out[who] = ours(bb, x, steps, blocks, noise)
            else:
                out[who] = [original_features(bb, x[i:i + 1], steps, blocks, noise)
                            for i in range(B)]
            _sync(device)
            timing[who] = (time.perf_counter() - t0) / B
            cpu[who] = (time.process_time() - c0) / B
        if g < args.check_groups:
            a, r = diffs(out["ours"], out["original"], steps, blocks)
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
        del out
        groups.append({"order": list(order), "original_s_per_image": timing["original"],
                       "ours_s_per_image": timing["ours"],
                       "ratio": timing["original"] / timing["ours"],
                       "original_cpu_s_per_image": cpu["original"],
                       "ours_cpu_s_per_image": cpu["ours"],
                       "cpu_ratio": cpu["original"] / cpu["ours"]})
        print(f"  {name} group {g} ({' then '.join(order)}): original "
              f"{timing['original']:.2f} s/image, ours {timing['ours']:.2f} s/image, "
              f"{groups[-1]['ratio']:.2f}x (CPU time {groups[-1]['cpu_ratio']:.2f}x)",
              file=sys.stderr, flush=True)
    dim = sum(bb.block_shapes(blocks)[b][0] for b in blocks) * len(steps)
    result = {
        "model": name, "preset": preset, "weights": checkpoint or "random (seed 0)",
        "parameters": sum(p.numel() for p in bb.model.parameters()),
        "images": source, "image_size": size, "steps": list(steps), "blocks": list(blocks),
        "feature_dim": dim, "batch_images": B, "groups": groups, "build_s": round(build_s, 2),
        "median_ratio": statistics.median(g["ratio"] for g in groups),
        "original_s_per_image_median": statistics.median(
            g["original_s_per_image"] for g in groups),
        "ours_s_per_image_median": statistics.median(g["ours_s_per_image"] for g in groups),
        # Process CPU seconds (all threads): less sensitive to other jobs than wall time.
        "median_cpu_ratio": statistics.median(g["cpu_ratio"] for g in groups),
        "max_abs_diff": max_abs, "max_rel_diff": max_rel,
    }
    del bb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lsun_256,faces_64",
                   help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--groups", type=int, default=4, help="interleaved groups per model")
    p.add_argument("--batch-images", type=int, default=1,
                   help="images per forward of ours (the original runs one at a time)")
    p.add_argument("--check-groups", type=int, default=1,
                   help="groups whose features are compared (after timing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the fairest comparison on a shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of random images without ../shared")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                        / "extract_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            p.error(f"unknown model {n!r}; use {', '.join(MODELS)}")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    results = [bench_model(n, device, args) for n in names]

    print(f"[{device}: {machine}; {torch.get_num_threads()} threads; shared machine: "
          f"contenders interleaved, median of per-group ratios]")
    print("| model | dims | original s/image | ours s/image | ratio (median) | CPU-time ratio | "
          "groups | max abs diff | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['feature_dim']} | {r['original_s_per_image_median']:.2f} | "
              f"{r['ours_s_per_image_median']:.2f} | **{r['median_ratio']:.2f}x** | "
              f"{r['median_cpu_ratio']:.2f}x | "
              f"{len(r['groups'])} x {r['batch_images']} | {r['max_abs_diff']:.3g} | "
              f"{r['max_rel_diff']:.3g} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "extract_speed", "device": str(device),
                               "machine": machine, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Feature extraction speed: ddpmseg's Backbone against the reference extractor's way.

The reference (ddpm-segmentation) runs one full UNet forward per step -- every decoder block and
the ``out`` head -- with hooks on the chosen blocks, then upsamples each block's map to the image
size (bilinear, align_corners=False) and concatenates them in float32. Ours runs an image's steps
as one batch and stops after the deepest requested block. Both use the same randomly initialised
LSUN-256 architecture (553M parameters) in the same process, the same images and noise.

Reported per device: seconds per image for the reference, for ours (activations, as our pipeline
consumes them), for ours plus the same upsampling (dense features, like for like), the speed-up,
and the max abs difference between the dense features of both.

    python bench/extract_speed.py [--images 2] [--devices cpu,cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ddpmseg.backbone import Backbone  # noqa: E402
from ddpmseg.device import resolve_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """(1, sum C, size, size): each (1, C, h, w) map upsampled and concatenated, as reference."""
    return torch.cat([F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                      for m in maps], dim=1)


def reference_features(bb: Backbone, x0: torch.Tensor, steps, blocks, noise) -> torch.Tensor:
    """One image (1, 3, H, W) -> (1, D, H, W), the reference extractor's way."""
    model, captured = bb.model, {}
    hooks = [model.output_blocks[b].register_forward_hook(
        lambda mod, args, out, b=b: captured.__setitem__(b, out)) for b in blocks]
    maps = []
    try:
        with torch.inference_mode():
            for t in steps:
                tt = torch.tensor([t], device=bb.device)
                x_t = bb.schedule.q_sample(x0, tt, noise)
                model(x_t, tt)  # full forward, `out` included; its output is discarded
                maps.extend(captured[b] for b in blocks)
                captured.clear()
            return dense(maps, x0.shape[-1])
    finally:
        for h in hooks:
            h.remove()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> float:
    """max |a - b| over channels in chunks, so two 2 GB tensors need no third one."""
    return max(float((a[:, i:i + chunk] - b[:, i:i + chunk]).abs().max())
               for i in range(0, a.shape[1], chunk))


def bench_device(device: torch.device, args) -> dict:
    steps, blocks = args.steps, args.blocks
    t0 = time.perf_counter()
    bb = Backbone.random(args.preset, seed=args.seed, device=device)
    build_s = time.perf_counter() - t0
    size = bb.flags.image_size
    gen = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(args.images, 3, size, size, generator=gen) * 2 - 1).to(device)
    noise = bb.default_noise(size, size, seed=0)

    # First calls per input shape pick kernels (oneDNN primitives, cuDNN algorithms): not
    # what we measure, and they would favour whichever path runs second.
    for _ in range(args.warmup):
        bb.activations(images[:1], steps, blocks, noise=noise)
        reference_features(bb, images[:1], steps, blocks, noise)
    _sync(device)

    ref_s = ours_s = ours_up_s = 0.0
    diff = diff_unbatched = 0.0
    for i in range(args.images):
        x0 = images[i:i + 1]
        _sync(device)
        t0 = time.perf_counter()
        ref = reference_features(bb, x0, steps, blocks, noise)
        _sync(device)
        ref_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        acts = bb.activations(x0, steps, blocks, noise=noise)
        _sync(device)
        ours_s += time.perf_counter() - t0
        ours = dense([acts[(t, b)] for t in steps for b in blocks], size)
        _sync(device)
        ours_up_s += time.perf_counter() - t0
        diff = max(diff, max_abs_diff(ours, ref))
        del ours, acts
        if i == 0 and args.check_unbatched:
            # One step per forward: what batching alone changes (matmul/conv blocking).
            acts = bb.activations(x0, steps, blocks, noise=noise, max_batch=1)
            ours = dense([acts[(t, b)] for t in steps for b in blocks], size)
            diff_unbatched = max_abs_diff(ours, ref)
            del ours, acts
        dim = ref.shape[1]
        del ref

    n = args.images
    result = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "images": n, "steps": steps, "blocks": blocks, "feature_dim": dim,
        "parameters": sum(p.numel() for p in bb.model.parameters()),
        "build_s": round(build_s, 2),
        "reference_s_per_image": ref_s / n,
        "ours_s_per_image": ours_s / n,
        "ours_with_upsample_s_per_image": ours_up_s / n,
        "speedup": ref_s / ours_s,
        "speedup_with_upsample": ref_s / ours_up_s,
        "max_abs_diff": diff,
        "max_abs_diff_unbatched": diff_unbatched if args.check_unbatched else None,
    }
    del bb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--steps", default="50,150,250")
    p.add_argument("--blocks", default="5,6,7,8,12")
    p.add_argument("--preset", default="lsun_256")
    p.add_argument("--devices", default=None,
                   help="comma-separated; default cpu, plus cuda when present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds on the first image")
    p.add_argument("--no-check-unbatched", dest="check_unbatched", action="store_false",
                   help="skip the one-step-per-forward exactness check")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                        / "extract_speed.json"))
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.blocks = [int(b) for b in args.blocks.split(",")]
    names = args.devices.split(",") if args.devices else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    results = []
    for name in names:
        device = resolve_device(name.strip())
        r = bench_device(device, args)
        results.append(r)
        print(f"[{r['device']}: {r['device_name']}, {r['threads']} threads] "
              f"{args.preset}, {r['images']} images, steps {args.steps}, blocks {args.blocks} "
              f"({r['feature_dim']} dims)")
        print(f"  reference (full forward per step + upsample): "
              f"{r['reference_s_per_image']:.2f} s/image")
        print(f"  ours (batched steps, early exit):             "
              f"{r['ours_s_per_image']:.2f} s/image  -> {r['speedup']:.2f}x")
        print(f"  ours + the same upsampling:                   "
              f"{r['ours_with_upsample_s_per_image']:.2f} s/image  -> "
              f"{r['speedup_with_upsample']:.2f}x")
        print(f"  max |ours - reference| over dense features: {r['max_abs_diff']:.3g}"
              + ("" if r["max_abs_diff_unbatched"] is None else
                 f" (one step per forward: {r['max_abs_diff_unbatched']:.3g})"))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "extract_speed", "preset": args.preset,
                               "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

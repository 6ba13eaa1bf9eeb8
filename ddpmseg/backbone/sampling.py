"""A short ancestral sampler, as guided-diffusion defines it: ``sample`` draws images with DDPM
ancestral sampling over a strided ("respaced") subset of the training steps, for the sample
grids a training run writes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpmseg.backbone.diffusion import Schedule
from ddpmseg.backbone.adm.flags import ModelFlags


@torch.no_grad()
def sample(model: torch.nn.Module, flags: ModelFlags, num: int, steps: int = 50,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu"
           ) -> torch.Tensor:
    """``num`` images (num, 3, H, W) in [-1, 1] by ancestral sampling over ``steps`` strided steps.

    Noise is drawn on the CPU from ``generator`` so that samples do not touch the global RNG.
    """
    sched = Schedule.from_flags(flags).respaced(steps)
    size = flags.image_size
    shape = (num, 3, size, size)
    x = torch.randn(shape, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        for i in reversed(range(sched.num_steps)):
            t = torch.full((num,), i, dtype=torch.long, device=device)
            out = model(x, sched.model_timesteps(t))
            mean, log_var = sched.p_mean_logvar(out.float(), x, t, flags.learn_sigma, clip=True)
            if i > 0:
                z = torch.randn(shape, generator=generator).to(device)
                x = mean + torch.exp(0.5 * log_var) * z
            else:
                x = mean
    finally:
        model.train(was_training)
    return x.clamp(-1, 1)


def image_grid(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> a uint8 (rows*H, cols*W, 3) grid, about square."""
    n, _, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    arr = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[k]
    return grid

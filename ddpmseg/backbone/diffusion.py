"""Noise schedules and the forward process q(x_t | x_0), as guided-diffusion computes them.

Only the forward process is needed: feature extraction noises a clean image to step t and reads
the UNet's activations; nothing is ever sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError


def linear_betas(num_steps: int) -> np.ndarray:
    """The DDPM linear schedule, rescaled so that any step count spans the same noise range."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The improved-DDPM cosine schedule, via alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    # Clipped because the last step's ratio tends to 0 and beta = 1 would be singular.
    betas = [min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


@dataclass(frozen=True, eq=False)
class Schedule:
    """A beta schedule and the float64 products q_sample reads."""

    name: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def coefficients(self, t: int | torch.Tensor, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 tensors shaped like ``t``.

        Indexed in float64 and cast once, as guided-diffusion does, so x_t is bit-identical.
        """
        idx = torch.as_tensor(t, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise ConfigError(f"diffusion step out of range 0..{self.num_steps - 1}: "
                              f"{idx.tolist()}")
        # Fancy indexing copies, so the cached read-only arrays never reach torch.from_numpy.
        sel = idx.cpu().numpy()
        a = torch.tensor(np.asarray(self.sqrt_alphas_cumprod[sel])).float().to(device)
        b = torch.tensor(np.asarray(self.sqrt_one_minus_alphas_cumprod[sel])).float().to(device)
        return a, b

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0: (N, C, H, W); t: an int or an (N,) integer tensor; noise: broadcastable to x0.
        Returns (N, C, H, W) in x0's dtype (float32 coefficients).
        """
        a, b = self.coefficients(t, x0.device)
        if a.dim() == 1:
            # One step per batch element: broadcast over the remaining dims.
            shape = (-1,) + (1,) * (x0.dim() - 1)
            a, b = a.view(shape), b.view(shape)
        return a * x0 + b * noise


@lru_cache(maxsize=None)
def get_schedule(name: str = "linear", num_steps: int = 1000) -> Schedule:
    """The named schedule over ``num_steps`` steps (cached; arrays are read-only)."""
    key = str(name).strip().lower()
    if key not in SCHEDULES:
        raise ConfigError(f"unknown noise_schedule {name!r}",
                          f"use one of {', '.join(sorted(SCHEDULES))}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ConfigError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    betas = SCHEDULES[key](num_steps)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    arrays = [betas, alphas_cumprod, np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)]
    for a in arrays:
        a.setflags(write=False)  # shared through the cache
    return Schedule(key, *arrays)


def q_sample(x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor,
             schedule: Schedule | str = "linear", num_steps: int = 1000) -> torch.Tensor:
    """Noise ``x0`` to step ``t`` under ``schedule`` (a Schedule or a registered name)."""
    if not isinstance(schedule, Schedule):
        schedule = get_schedule(schedule, num_steps)
    return schedule.q_sample(x0, t, noise)

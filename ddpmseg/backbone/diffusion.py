"""The diffusion process, as guided-diffusion defines it: one ``Schedule`` owns every coefficient.

Extraction noises a clean image to step t (``q_sample``) and calls the UNet with
``model_timesteps(t)``; training adds the posterior q(x_{t-1} | x_t, x_0) and the model's
p(x_{t-1} | x_t) (``p_mean_logvar``); sampling walks a strided subset of the steps
(``respaced``). All three read the same float64 tables, cast to float32 once per device, so
x_t is bit-identical whichever path computes it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from ddpmseg.core.errors import ConfigError


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

# The float64 tables a Schedule holds (attribute names), all of length num_steps.
TABLES = (
    "betas", "log_betas", "alphas_cumprod", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
    "posterior_mean_coef2", "fixed_log_variance",
)


class Schedule:
    """A beta schedule and every coefficient derived from it (guided-diffusion's
    GaussianDiffusion, without the parts ddpmseg never uses).

    ``timestep_map``: for a respaced schedule, the original step each of its steps stands for
    (what the UNet is called with); ``rescale_timesteps`` maps those to 0..1000 as the model's
    flag asks. Build with ``get_schedule`` / ``from_flags`` (cached) or ``respaced``.
    """

    def __init__(self, betas: np.ndarray, name: str = "custom", *,
                 timestep_map: np.ndarray | None = None, rescale_timesteps: bool = False,
                 original_steps: int | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        n = len(betas)
        self.name = name
        self.rescale_timesteps = bool(rescale_timesteps)
        self.original_steps = int(original_steps or n)
        self.timestep_map = (np.arange(n) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.betas = betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = acp
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        self.posterior_variance = post_var
        # The variance at t=0 is 0; its log is clipped to the value at t=1 as guided-diffusion does.
        self.posterior_log_variance_clipped = (np.log(np.append(post_var[1], post_var[1:]))
                                               if n > 1 else np.log(np.maximum(post_var, 1e-20)))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        # Fixed-large variance (learn_sigma off): beta_t, with the posterior's at t=0.
        self.fixed_log_variance = (np.log(np.append(post_var[1], betas[1:])) if n > 1
                                   else self.posterior_log_variance_clipped)
        for key in TABLES:
            getattr(self, key).setflags(write=False)  # shared through the cache
        self.timestep_map.setflags(write=False)
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_flags(cls, flags) -> "Schedule":
        """The schedule a ModelFlags describes (noise_schedule, diffusion_steps,
        rescale_timesteps)."""
        return get_schedule(flags.noise_schedule, flags.diffusion_steps,
                            rescale_timesteps=flags.rescale_timesteps)

    def respaced(self, num_steps: int) -> "Schedule":
        """``num_steps`` evenly strided steps of this schedule (guided-diffusion's "N")."""
        total = self.num_steps
        num_steps = max(1, min(int(num_steps), total))
        if num_steps == 1:
            use = [0]
        else:
            stride = (total - 1) / (num_steps - 1)
            use = sorted({round(i * stride) for i in range(num_steps)})
        # New betas that keep the cumulative products of the kept steps.
        betas, last = [], 1.0
        for i in use:
            betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return Schedule(np.array(betas), self.name, timestep_map=self.timestep_map[use],
                        rescale_timesteps=self.rescale_timesteps,
                        original_steps=self.original_steps)

    # -- coefficients -----------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        # Cast once per device: float64 -> float32 element by element, so indexing the float32
        # table equals casting the indexed float64 value (guided-diffusion's order).
        tabs = self._device_tables.get(device)
        if tabs is None:
            tabs = {k: torch.tensor(getattr(self, k), dtype=torch.float64).float().to(device)
                    for k in TABLES}
            tabs["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.long,
                                                device=device)
            self._device_tables[device] = tabs
        return tabs

    def _index(self, t: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        idx = torch.as_tensor(t, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise ConfigError(f"diffusion step out of range 0..{self.num_steps - 1}: "
                              f"{idx.tolist()}")
        return idx.to(device)

    def coef(self, name: str, t: int | torch.Tensor, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
        """Table ``name`` at steps ``t`` as float32 on ``device``, shaped like ``t``."""
        device = torch.device(device)
        return self._tables(device)[name][self._index(t, device)]

    def coef_like(self, name: str, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``coef`` broadcastable against ``like`` (N, ...): (N, 1, 1, 1) for per-item steps."""
        c = self.coef(name, t, like.device)
        if c.dim() == 1:
            c = c.view((-1,) + (1,) * (like.dim() - 1))
        return c

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0: (N, C, H, W); t: an int or an (N,) integer tensor; noise: broadcastable to x0.
        Returns (N, C, H, W) in x0's dtype (float32 coefficients).
        """
        return (self.coef_like("sqrt_alphas_cumprod", t, x0) * x0
                + self.coef_like("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is called with: the original step, rescaled to 0..1000 when asked."""
        mapped = self._tables(t.device)["timestep_map"][t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_steps)
        return mapped

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                         ) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return (self.coef_like("posterior_mean_coef1", t, x_t) * x0
                + self.coef_like("posterior_mean_coef2", t, x_t) * x_t)

    def p_mean_logvar(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      learn_sigma: bool, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of p(x_{t-1} | x_t) from the model output (epsilon [+ v])."""
        if learn_sigma:
            eps, v = out[:, :3], out[:, 3:]
            frac = (v + 1) / 2
            clipped = self.coef_like("posterior_log_variance_clipped", t, x_t)
            log_var = frac * self.coef_like("log_betas", t, x_t) + (1 - frac) * clipped
        else:
            eps = out[:, :3]
            log_var = self.coef_like("fixed_log_variance", t, x_t).expand_as(x_t)
        x0 = (self.coef_like("sqrt_recip_alphas_cumprod", t, x_t) * x_t
              - self.coef_like("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        return self.q_posterior_mean(x0, x_t, t), log_var


@lru_cache(maxsize=None)
def get_schedule(name: str = "linear", num_steps: int = 1000, *,
                 rescale_timesteps: bool = False) -> Schedule:
    """The named schedule over ``num_steps`` steps (cached; arrays are read-only)."""
    key = str(name).strip().lower()
    if key not in SCHEDULES:
        raise ConfigError(f"unknown noise_schedule {name!r}",
                          f"use one of {', '.join(sorted(SCHEDULES))}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ConfigError(f"diffusion steps must be a positive integer, got {num_steps!r}")
    return Schedule(SCHEDULES[key](num_steps), key, rescale_timesteps=rescale_timesteps)


def q_sample(x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor,
             schedule: Schedule | str = "linear", num_steps: int = 1000) -> torch.Tensor:
    """Noise ``x0`` to step ``t`` under ``schedule`` (a Schedule or a registered name)."""
    if not isinstance(schedule, Schedule):
        schedule = get_schedule(schedule, num_steps)
    return schedule.q_sample(x0, t, noise)

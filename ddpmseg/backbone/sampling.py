"""Diffusion terms for training and a short ancestral sampler, as guided-diffusion defines them.

``DiffusionTerms`` holds the float64 schedule products cast once to float32 tensors on the
training device; ``training_losses`` is the DDPM objective (epsilon MSE, plus the variational
bound on the learned variance when the model predicts it); ``sample`` draws images with DDPM
ancestral sampling over a strided ("respaced") subset of the training steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .diffusion import get_schedule
from .flags import ModelFlags


def _posterior(betas: np.ndarray) -> dict[str, np.ndarray]:
    """q(x_{t-1} | x_t, x_0) coefficients of a beta schedule (all float64)."""
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "sqrt_acp": np.sqrt(acp),
        "sqrt_1m_acp": np.sqrt(1.0 - acp),
        "sqrt_recip_acp": np.sqrt(1.0 / acp),
        "sqrt_recipm1_acp": np.sqrt(1.0 / acp - 1.0),
        "post_var": post_var,
        # The variance at t=0 is 0; its log is clipped to the value at t=1 as guided-diffusion does.
        "post_log_var": np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1
        else np.log(np.maximum(post_var, 1e-20)),
        "post_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "post_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }


class DiffusionTerms:
    """Schedule coefficients as float32 tensors on ``device``, indexed per batch element."""

    def __init__(self, betas: np.ndarray, device: torch.device | str = "cpu",
                 timestep_map: np.ndarray | None = None, rescale_timesteps: bool = False,
                 original_steps: int | None = None):
        self.num_steps = len(betas)
        terms = _posterior(np.asarray(betas, dtype=np.float64))
        # Fixed-large variance (learn_sigma off): beta_t, with the posterior's at t=0.
        terms["fixed_log_var"] = np.log(np.append(terms["post_var"][1], betas[1:])) \
            if self.num_steps > 1 else terms["post_log_var"]
        self.t = {k: torch.tensor(v, dtype=torch.float64).float().to(device)
                  for k, v in terms.items()}
        tmap = np.arange(self.num_steps) if timestep_map is None else np.asarray(timestep_map)
        self.timestep_map = torch.tensor(tmap, dtype=torch.long, device=device)
        self.rescale = rescale_timesteps
        self.original_steps = original_steps or self.num_steps

    @classmethod
    def from_flags(cls, flags: ModelFlags, device: torch.device | str = "cpu") -> "DiffusionTerms":
        sched = get_schedule(flags.noise_schedule, flags.diffusion_steps)
        return cls(np.array(sched.betas), device, rescale_timesteps=flags.rescale_timesteps)

    @classmethod
    def respaced(cls, flags: ModelFlags, num_steps: int, device: torch.device | str = "cpu"
                 ) -> "DiffusionTerms":
        """``num_steps`` evenly strided steps of the full schedule (guided-diffusion's "N")."""
        sched = get_schedule(flags.noise_schedule, flags.diffusion_steps)
        total = flags.diffusion_steps
        num_steps = max(1, min(int(num_steps), total))
        if num_steps == 1:
            use = [0]
        else:
            stride = (total - 1) / (num_steps - 1)
            use = sorted({round(i * stride) for i in range(num_steps)})
        acp = np.array(sched.alphas_cumprod)
        betas, last = [], 1.0
        for i in use:
            betas.append(1.0 - acp[i] / last)
            last = acp[i]
        return cls(np.array(betas), device, timestep_map=np.array(use),
                   rescale_timesteps=flags.rescale_timesteps, original_steps=total)

    def get(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at steps ``t`` (N,), shaped (N, 1, 1, 1) to broadcast on images."""
        return self.t[name][t].view(-1, 1, 1, 1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is called with: the original step, rescaled to 0..1000 when asked."""
        mapped = self.timestep_map[t]
        if self.rescale:
            return mapped.float() * (1000.0 / self.original_steps)
        return mapped

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.get("sqrt_acp", t) * x0 + self.get("sqrt_1m_acp", t) * noise

    def p_mean_logvar(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      learn_sigma: bool, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of p(x_{t-1} | x_t) from the model output (epsilon [+ v])."""
        if learn_sigma:
            eps, v = out[:, :3], out[:, 3:]
            frac = (v + 1) / 2
            log_var = frac * self.get("log_betas", t) + (1 - frac) * self.get("post_log_var", t)
        else:
            eps = out[:, :3]
            log_var = self.get("fixed_log_var", t).expand_as(x_t)
        x0 = self.get("sqrt_recip_acp", t) * x_t - self.get("sqrt_recipm1_acp", t) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self.get("post_coef1", t) * x0 + self.get("post_coef2", t) * x_t
        return mean, log_var


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of [-1, 1] data quantised to 256 levels under a Gaussian (per pixel)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def training_losses(model: torch.nn.Module, terms: DiffusionTerms, x0: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, learn_sigma: bool
                    ) -> dict[str, torch.Tensor]:
    """Per-sample losses (N,): ``mse`` on epsilon, ``vb`` (learn_sigma only) and ``loss``.

    The hybrid objective of guided-diffusion: the variational-bound term sees the predicted mean
    through a stop-gradient, so it trains only the variance channels.
    """
    x_t = terms.q_sample(x0, t, noise)
    out = model(x_t, terms.model_timesteps(t))
    mse = ((out[:, :3] - noise) ** 2).mean(dim=(1, 2, 3))
    res = {"mse": mse}
    if learn_sigma:
        frozen = torch.cat([out[:, :3].detach(), out[:, 3:]], dim=1)
        mean, log_var = terms.p_mean_logvar(frozen, x_t, t, True, clip=False)
        true_mean = terms.get("post_coef1", t) * x0 + terms.get("post_coef2", t) * x_t
        true_log_var = terms.get("post_log_var", t)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        res["vb"] = vb
        res["loss"] = mse + vb
    else:
        res["loss"] = mse
    return res


@torch.no_grad()
def sample(model: torch.nn.Module, flags: ModelFlags, num: int, steps: int = 50,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu"
           ) -> torch.Tensor:
    """``num`` images (num, 3, H, W) in [-1, 1] by ancestral sampling over ``steps`` strided steps.

    Noise is drawn on the CPU from ``generator`` so that samples do not touch the global RNG.
    """
    terms = DiffusionTerms.respaced(flags, steps, device)
    size = flags.image_size
    shape = (num, 3, size, size)
    x = torch.randn(shape, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        for i in reversed(range(terms.num_steps)):
            t = torch.full((num,), i, dtype=torch.long, device=device)
            out = model(x, terms.model_timesteps(t))
            mean, log_var = terms.p_mean_logvar(out.float(), x, t, flags.learn_sigma, clip=True)
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

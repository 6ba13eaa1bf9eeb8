"""The DDPM training objective (guided-diffusion's): epsilon MSE, plus the variational bound on
the variance channels when the model learns its variance."""

from __future__ import annotations

import math

import torch

from ddpmseg.backbone.diffusion import Schedule


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


def training_losses(model: torch.nn.Module, schedule: Schedule, x0: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, learn_sigma: bool
                    ) -> dict[str, torch.Tensor]:
    """Per-sample losses (N,): ``mse`` on epsilon, ``vb`` (learn_sigma only) and ``loss``.

    The hybrid objective of guided-diffusion: the variational-bound term sees the predicted mean
    through a stop-gradient, so it trains only the variance channels.
    """
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t, schedule.model_timesteps(t))
    mse = ((out[:, :3] - noise) ** 2).mean(dim=(1, 2, 3))
    res = {"mse": mse}
    if learn_sigma:
        frozen = torch.cat([out[:, :3].detach(), out[:, 3:]], dim=1)
        mean, log_var = schedule.p_mean_logvar(frozen, x_t, t, True, clip=False)
        true_mean = schedule.q_posterior_mean(x0, x_t, t)
        true_log_var = schedule.coef_like("posterior_log_variance_clipped", t, x_t)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        res["vb"] = vb
        res["loss"] = mse + vb
    else:
        res["loss"] = mse
    return res

"""Noise schedules and q_sample, against guided-diffusion's definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmseg.backbone import get_schedule, q_sample
from ddpmseg.core.errors import ConfigError


def test_linear_schedule_endpoints_and_dtype():
    s = get_schedule("linear", 1000)
    assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
    assert len(s.betas) == 1000
    assert s.betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=0, atol=0)


def test_linear_schedule_scales_with_step_count():
    s = get_schedule("linear", 250)
    assert len(s.betas) == 250
    assert s.betas[0] == pytest.approx(4e-4) and s.betas[-1] == pytest.approx(0.08)


def test_cosine_schedule():
    s = get_schedule("cosine", 1000)
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.betas[0] == pytest.approx(1 - abar(1 / 1000) / abar(0), rel=1e-12)
    assert s.betas.max() <= 0.999
    assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_q_sample_is_the_float32_formula():
    s = get_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(1, 3, 8, 8, generator=g)
    a = torch.tensor(s.sqrt_alphas_cumprod[100]).float()
    b = torch.tensor(s.sqrt_one_minus_alphas_cumprod[100]).float()
    assert torch.equal(q_sample(x0, 100, noise), a * x0 + b * noise)
    per_item = q_sample(x0, torch.tensor([100, 500]), noise)
    assert per_item.dtype == torch.float32
    assert torch.equal(per_item[0], (a * x0 + b * noise)[0])
    assert torch.equal(per_item[1], q_sample(x0[1:], 500, noise)[0])


def test_schedule_errors():
    with pytest.raises(ConfigError, match="sigmoid"):
        get_schedule("sigmoid", 1000)
    with pytest.raises(ConfigError):
        get_schedule("linear", 0)
    with pytest.raises(ConfigError, match="out of range"):
        q_sample(torch.zeros(1, 3, 4, 4), 1000, torch.zeros(1, 3, 4, 4))


def test_respaced_schedule_keeps_the_kept_steps_products_and_maps_timesteps():
    s = get_schedule("linear", 100, rescale_timesteps=True)
    r = s.respaced(4)
    assert r.timestep_map.tolist() == [0, 33, 66, 99]
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[[0, 33, 66, 99]], rtol=1e-12)
    # The UNet sees the original step, rescaled to 0..1000 (the flag), never the strided index.
    assert r.model_timesteps(torch.tensor([1, 3])).tolist() == [330.0, 990.0]
    assert get_schedule("linear", 100).model_timesteps(torch.tensor([7])).tolist() == [7]


def test_posterior_coefficients_are_guided_diffusions():
    s = get_schedule("linear", 1000)
    t = 500
    acp, acp_prev = s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
    var = s.betas[t] * (1 - acp_prev) / (1 - acp)
    assert s.posterior_variance[t] == pytest.approx(var, rel=1e-12)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert s.posterior_mean_coef1[t] == pytest.approx(s.betas[t] * math.sqrt(acp_prev) / (1 - acp))
    # Every coefficient is the float64 value cast once to float32, on any path.
    assert s.coef("posterior_mean_coef2", torch.tensor([t])).item() == \
        np.float32(s.posterior_mean_coef2[t])

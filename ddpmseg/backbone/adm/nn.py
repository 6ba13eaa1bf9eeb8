"""Small layers the ADM UNet is built from."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# Device types autocast knows; asking about others (meta, for dry runs) is an error.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype.

    The statistics of large activations lose too much in half precision; the published models
    were trained with this float32 normalisation, so features depend on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) -> (N, C, ...) in x's dtype."""
        if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
            # Autocast may lower group_norm itself; keep the float32 promise under it too.
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x.float(), self.num_groups, self.weight.float(),
                                    self.bias.float(), self.eps).to(x.dtype)
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias,
                            self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The normalisation every ADM block uses: 32 groups."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
                       ) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps.

    timesteps: (N,) -> (N, dim) float32, cosines first then sines (ADM's order, which the
    trained time_embed weights expect).
    """
    half = dim // 2
    # Frequencies are made on the CPU and moved, as the original does, so that the CUDA
    # embedding is bit-identical to the CPU one instead of differing in exp()'s last ulp.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb

"""The ADM UNet of guided-diffusion, written for this project.

Module names and parameter shapes follow guided-diffusion's ``UNetModel`` one for one, so that
its published state dicts load with ``strict=True``; that is the only reason for names such as
``in_layers.2`` or ``out.2``. Only 2-D images are supported and there is no gradient
checkpointing. A built model keeps PyTorch's default initialisation (a randomly built model is
used for benchmarks, where all-zero residual branches would make features degenerate);
``zero_init_`` gives guided-diffusion's initialisation for training from scratch.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpmseg.backbone.adm.flags import ModelFlags
from ddpmseg.core.errors import ConfigError
from ddpmseg.spec import check_blocks
from ddpmseg.backbone.adm.nn import normalization, timestep_embedding


def _no_autograd() -> bool:
    """Whether the fast inference path may run: under no_grad and inference_mode alike (the
    two must give the same numbers), never where autograd records (training)."""
    return not torch.is_grad_enabled()


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), emb: (N, E) -> (N, C', H', W')."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C_out, 2H, 2W)."""
        if self.use_conv and _no_autograd():
            return upsample_conv(x, self.conv)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest 2x upsample of x)`` for a 3x3, padding-1 conv, computed at x's size.

    x: (N, C, H, W) -> (N, C_out, 2H, 2W). Each output pixel of a given parity (row, column
    even or odd) sees the upsampled copies of only 2x2 input pixels, so the 3x3 kernel folds
    into four 2x2 kernels (taps that land on the same input pixel are summed) applied to x
    itself: 16 instead of 36 multiply-adds per output value and input pair. The same sums in
    another order, so the result differs from the direct way in the last float bits.
    """
    w = conv.weight.float()  # fold in float32, then back to the weight's own dtype
    # Rows (and likewise columns): an even output row 2i reads input rows i-1, i with
    # kernel rows (0, 1+2); an odd one 2i+1 reads rows i, i+1 with kernel rows (0+1, 2).
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    folded = torch.cat([torch.stack(pair, 3) for r in rows
                        for pair in ((r[..., 0], r[..., 1] + r[..., 2]),
                                     (r[..., 0] + r[..., 1], r[..., 2]))])
    bias = None if conv.bias is None else conv.bias.repeat(4)
    # Padding 1 and a 2x2 window give (H+1, W+1) positions; parity a starts at offset a.
    both = F.conv2d(F.pad(x, (1, 1, 1, 1)), folded.to(conv.weight.dtype), bias)
    n, c_out, (h, w_) = x.shape[0], w.shape[0], x.shape[-2:]
    out = both.new_empty((n, c_out, 2 * h, 2 * w_))
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = both[:, k * c_out:(k + 1) * c_out, a:a + h, b:b + w_]
    return out


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv, or by 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ConfigError("average-pool downsampling cannot change the channel count",
                                  "pass `use_conv=True`")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C_out, H/2, W/2)."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    With ``use_scale_shift_norm`` the embedding gives a per-channel scale and shift applied after
    the second norm (FiLM), so emb_layers is twice as wide as the output.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, *,
                 out_channels: int | None = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False)
            self.x_upd = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels,
                      2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), emb: (N, E) -> (N, C_out, H', W') (H' = 2H up, H/2 down)."""
        if _no_autograd():
            return self._forward_inplace(x, emb)
        if self.updown:
            # Resample between the activation and the conv: the conv then runs at the new size.
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def _forward_inplace(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd: the same operations, but every temporary that
        only this block holds is updated in place, and an upsampling block runs its first conv
        at the input's size (``upsample_conv``). Each large activation is then allocated once
        instead of up to nine times (on the CPU every fresh allocation of a large tensor is
        page-faulted in anew, which cost about a third of a 256px block's time). Values equal
        the direct way's up to the order of float sums (tested)."""
        h = F.silu(self.in_layers[0](x), inplace=True)   # GroupNorm32 returns a new tensor
        if isinstance(self.h_upd, Upsample):  # the conv of the upsampled h, at h's size
            h = upsample_conv(h, self.in_layers[2])
        else:
            h = self.in_layers[2](self.h_upd(h))  # h_upd is Identity when not resampling
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h).mul_(1 + scale).add_(shift)
        else:
            h = self.out_layers[0](h.add_(emb_out))
        h = self.out_layers[3](self.out_layers[2](F.silu(h, inplace=True)))
        skip = self.skip_connection(x)
        # Addition commutes exactly; only a dtype promotion (mixed precision) needs a new tensor.
        return h.add_(skip) if torch.result_type(h, skip) == h.dtype else skip + h


class QKVAttention(nn.Module):
    """Attention over a qkv tensor. ``legacy`` (the original order) lays it out heads first,
    then q/k/v; otherwise q/k/v first, then heads (use_new_attention_order). No parameters."""

    def __init__(self, n_heads: int, legacy: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.legacy = legacy

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: (N, 3 * heads * c, T) -> (N, heads * c, T)."""
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if self.legacy:
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        else:
            q, k, v = (a.reshape(bs * self.n_heads, ch, length) for a in qkv.chunk(3, dim=1))
        return _attend(q, k, v, ch).reshape(bs, -1, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """Softmax attention; q, k, v: (B, c, T) -> (B, c, T)."""
    # Scaling q and k by ch**-1/4 each (not the product by ch**-1/2) is what the trained models
    # saw; it keeps half-precision products in range, and changes float32 results in the ulps.
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads, legacy=not use_new_attention_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        # Without autograd h is this block's own temporary: add in place (same value).
        in_place = _no_autograd() and torch.result_type(h, x) == h.dtype
        h = h.add_(x) if in_place else x + h
        return h.reshape(b, c, *spatial)


class _Parts:
    """Builds the UNet's blocks with the settings they all share."""

    def __init__(self, emb_dim: int, dropout: float, use_scale_shift_norm: bool,
                 num_head_channels: int, use_new_attention_order: bool, conv_resample: bool,
                 resblock_updown: bool):
        self.emb_dim = emb_dim
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.num_head_channels = num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.conv_resample = conv_resample
        self.resblock_updown = resblock_updown

    def res(self, ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
        return ResBlock(ch_in, self.emb_dim, self.dropout, out_channels=ch_out,
                        use_scale_shift_norm=self.use_scale_shift_norm, **kw)

    def attn(self, ch: int, heads: int) -> AttentionBlock:
        return AttentionBlock(ch, num_heads=heads, num_head_channels=self.num_head_channels,
                              use_new_attention_order=self.use_new_attention_order)

    def down(self, ch: int) -> nn.Module:
        return self.res(ch, ch, down=True) if self.resblock_updown else \
            Downsample(ch, self.conv_resample, out_channels=ch)

    def up(self, ch: int) -> nn.Module:
        return self.res(ch, ch, up=True) if self.resblock_updown else \
            Upsample(ch, self.conv_resample, out_channels=ch)


class UNetModel(nn.Module):
    """The ADM UNet: time embedding, encoder (input_blocks), middle_block, decoder
    (output_blocks) with skip connections, and the ``out`` head.

    ``attention_ds`` holds downsample rates (1 = full resolution), not pixel resolutions.
    ``decoder_shapes[i]`` is (channels, downsample rate) of output_blocks[i]'s output.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int,
                 out_channels: int, num_res_blocks: int, attention_ds: Iterable[int], *,
                 dropout: float = 0.0, channel_mult: Sequence[float] = (1, 2, 4, 8),
                 conv_resample: bool = True, num_classes: int | None = None,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.model_channels = model_channels
        self.num_classes = num_classes
        parts = _Parts(model_channels * 4, dropout, use_scale_shift_norm, num_head_channels,
                       use_new_attention_order, conv_resample, resblock_updown)
        # Built in guided-diffusion's order: a seeded default initialisation draws the same.
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, parts.emb_dim), nn.SiLU(),
            nn.Linear(parts.emb_dim, parts.emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, parts.emb_dim)
        widths = [int(mult * model_channels) for mult in channel_mult]
        attention_ds = set(attention_ds)
        skip_chans, ds = self._build_encoder(parts, in_channels, widths, num_res_blocks,
                                             attention_ds, num_heads)
        ch = widths[-1]
        self.middle_block = TimestepEmbedSequential(
            parts.res(ch), parts.attn(ch, num_heads), parts.res(ch))
        self._build_decoder(parts, widths, num_res_blocks, attention_ds, num_heads_upsample,
                            skip_chans, ds)
        self.out = nn.Sequential(
            normalization(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], out_channels, 3, padding=1))

    def _build_encoder(self, parts: "_Parts", in_channels: int, widths: list[int],
                       num_res_blocks: int, attention_ds: set[int], num_heads: int
                       ) -> tuple[list[int], int]:
        """input_blocks: a conv, then per level ``num_res_blocks`` ResBlocks (with attention
        where the downsample rate is in ``attention_ds``) and a downsampler but at the last.
        Returns the channels of each output (the decoder's skips) and the final rate."""
        ch = widths[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [parts.res(ch, width)]
                ch = width
                if ds in attention_ds:
                    layers.append(parts.attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(widths) - 1:
                self.input_blocks.append(TimestepEmbedSequential(parts.down(ch)))
                skip_chans.append(ch)
                ds *= 2
        return skip_chans, ds

    def _build_decoder(self, parts: "_Parts", widths: list[int], num_res_blocks: int,
                       attention_ds: set[int], num_heads: int, skip_chans: list[int],
                       ds: int) -> None:
        """output_blocks, deepest level first: ``num_res_blocks + 1`` ResBlocks per level, each
        reading one skip, and an upsampler closing every level but the top one; and
        ``decoder_shapes``."""
        self.output_blocks = nn.ModuleList()
        self.decoder_shapes: list[tuple[int, int]] = []
        ch = widths[-1]
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [parts.res(ch + skip_chans.pop(), width)]
                ch = width
                if ds in attention_ds:
                    layers.append(parts.attn(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(parts.up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.decoder_shapes.append((ch, ds))

    @classmethod
    def from_flags(cls, flags: ModelFlags) -> "UNetModel":
        """The model guided-diffusion's create_model builds for these flags."""
        return cls(
            image_size=flags.image_size, in_channels=3, model_channels=flags.num_channels,
            out_channels=flags.out_channels, num_res_blocks=flags.num_res_blocks,
            attention_ds=flags.attention_ds, dropout=flags.dropout, channel_mult=flags.mult,
            num_classes=flags.num_classes, num_heads=flags.num_heads,
            num_head_channels=flags.num_head_channels,
            num_heads_upsample=flags.num_heads_upsample,
            use_scale_shift_norm=flags.use_scale_shift_norm,
            resblock_updown=flags.resblock_updown,
            use_new_attention_order=flags.use_new_attention_order,
        )

    def _embed(self, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """timesteps: (N,), y: (N,) labels or None -> (N, 4 * model_channels)."""
        if (y is None) != (self.num_classes is None):
            raise ConfigError("class labels y must be given if and only if the model is "
                              "class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """The full model: x (N, 3, H, W), timesteps (N,), y (N,) -> (N, out_channels, H, W)."""
        emb = self._embed(timesteps, y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))

    def decoder_features(self, x: torch.Tensor, timesteps: torch.Tensor,
                         blocks: Iterable[int], y: torch.Tensor | None = None
                         ) -> dict[int, torch.Tensor]:
        """Outputs of the requested decoder blocks, stopping after the deepest one.

        x (N, 3, H, W), timesteps (N,), y (N,) or None -> {b: (N, C_b, h_b, w_b)}. Decoder
        blocks past max(blocks) and ``out`` are never run, and encoder outputs that only those
        blocks would read are not kept.
        """
        wanted = sorted(check_blocks(blocks, len(self.output_blocks), names=False))
        last = wanted[-1]
        # Decoder block i reads encoder output n-1-i; blocks 0..last need outputs >= n-1-last.
        first_kept = len(self.input_blocks) - 1 - last
        emb = self._embed(timesteps, y)
        hs = []
        h = x
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb)
            if i >= first_kept:
                hs.append(h)
        h = self.middle_block(h, emb)
        feats = {}
        for i, module in enumerate(self.output_blocks[:last + 1]):
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            if i in wanted:
                feats[i] = h
        return feats


def zero_init_(model: UNetModel) -> UNetModel:
    """guided-diffusion's initialisation for training from scratch, in place: the last conv of
    every ResBlock, every attention ``proj_out`` and the output conv start at zero, so each
    residual branch starts as the identity and a fresh model predicts exactly zero."""
    zeroed = [model.out[-1]]
    for module in model.modules():
        if isinstance(module, ResBlock):
            zeroed.append(module.out_layers[-1])
        elif isinstance(module, AttentionBlock):
            zeroed.append(module.proj_out)
    with torch.no_grad():
        for layer in zeroed:
            for p in layer.parameters():
                p.zero_()
    return model

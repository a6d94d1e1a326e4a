"""The thesis's noise-prediction U-Net (section 2.5.1, Figures 20-21), with capacity knobs.

Thesis configuration (UNetConfig() defaults), for 28x28x1:

    conv3x3 1 -> 32
    level 0 (28x28, 32 ch):  2 x ResBlock  -> skip0 ; conv3x3 stride 2, 32 -> 64
    level 1 (14x14, 64 ch):  2 x ResBlock  -> skip1 ; conv3x3 stride 2, 64 -> 128
    level 2 ( 7x7, 128 ch):  2 x ResBlock
    bottleneck (7x7):        2 x ResBlock  (optional self-attention between them)
    up:   convT4x4 stride 2, 128 -> 64 (14x14), concat skip1, 2 x ResBlock
    up:   convT4x4 stride 2,  64 -> 32 (28x28), concat skip0, 2 x ResBlock
    GroupNorm(4) -> Swish -> conv3x3 32 -> 1

ResBlock: GN(16) -> Swish -> conv3x3 -> + Linear(temb) -> GN(16) -> Swish -> Dropout -> conv3x3,
plus an identity or 1x1-conv skip. The time embedding is sinusoidal followed by an MLP
and feeds every ResBlock.

GroupNorm needs channels divisible by the group count, and — because the time embedding is
*added* right before norm2 as one constant per channel — at least two channels per group:
with one channel per group GroupNorm subtracts each channel's mean and erases the time
embedding entirely (a width-8 model with GN(16) would be blind to t). So the group count is
the largest divisor of the channel count that is <= the asked-for count and <= channels / 2
(the thesis's widths 32/64/128 keep GN(16) exactly).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import UNetConfig




def _groups(groups: int, channels: int) -> int:
    """Groups for GroupNorm over `channels`: a divisor of it, <= groups, with >= 2 channels per group."""
    limit = max(1, min(groups, channels // 2))
    return max(d for d in range(1, limit + 1) if channels % d == 0)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer positional encoding of the timestep (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over spatial positions, pre-norm, residual."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        if ch % heads:
            heads = math.gcd(ch, heads)
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t. `t` is the 1-indexed timestep."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg = config
        widths = cfg.widths
        w0 = cfg.base_width
        temb_dim = 4 * w0
        self.time_mlp = nn.Sequential(nn.Linear(w0, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        g = cfg.norm_groups

        # Every level's blocks are width -> width: conv_in lifts to the first width and each
        # stride-2 downsample both halves the resolution and raises the width to the next level's.
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, width in enumerate(widths):
            self.down_blocks.append(nn.ModuleList(
                ResBlock(width, width, temb_dim, cfg.dropout, g) for _ in range(cfg.blocks_per_level)))
            if level < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(width, widths[level + 1], 3, stride=2, padding=1))

        wb = widths[-1]
        self.mid_blocks = nn.ModuleList(ResBlock(wb, wb, temb_dim, cfg.dropout, g)
                                        for _ in range(cfg.bottleneck_blocks))
        self.mid_attn = SelfAttention(wb, cfg.attention_heads, g) if cfg.attention else None

        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            width = widths[level]
            self.upsamples.append(nn.ConvTranspose2d(widths[level + 1], width, 4, stride=2, padding=1))
            self.up_blocks.append(nn.ModuleList(
                ResBlock(2 * width if i == 0 else width, width, temb_dim, cfg.dropout, g)
                for i in range(cfg.blocks_per_level)))

        self.norm_out = nn.GroupNorm(_groups(cfg.final_norm_groups, widths[0]), widths[0])
        out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        # Built last, so an unconditional model's initialisation is unchanged by the option.
        # Index num_classes is the null label: the unconditional model of classifier-free guidance.
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.class_conditional else None

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                return_variance: bool = False):
        """eps (B, C, H, W); with return_variance=True the pair (eps, raw variance output or None).

        y: class labels (B,) for a class-conditional model; None means the null label."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(sinusoidal_embedding(t, self.config.base_width))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            temb = temb + self.label_emb(y)
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, temb)
            if level < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[level](h)
        for i, block in enumerate(self.mid_blocks):
            h = block(h, temb)
            if i == 0 and self.mid_attn is not None:  # attention between the bottleneck blocks
                h = self.mid_attn(h)
        if self.mid_attn is not None and not len(self.mid_blocks):
            h = self.mid_attn(h)
        for upsample, blocks in zip(self.upsamples, self.up_blocks):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if not self.config.learn_sigma:
            return (out, None) if return_variance else out
        eps, var_out = out.chunk(2, dim=1)
        return (eps, var_out) if return_variance else eps


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

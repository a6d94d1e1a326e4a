"""UNet.forward for K stacked members written with grouped operations (no vmap).

Activations keep one layout through the network: (B, K*C, H, W), member k's channels the
k-th block of C. In that layout each member-wise operation is one ordinary op:
a convolution is `conv2d(groups=K)`, GroupNorm(G) of every member is GroupNorm(K*G) (the
groups are contiguous channel blocks, so the statistics are the same), the time-embedding
Linear is one batched matmul, SiLU is elementwise. vmap lowers convolutions to the same
grouped convolution but moves the member dimension in and out of the batch around every op
(copies), and has GroupNorm apply its per-member affine as separate ops; here nothing moves.
`channels_last=True` puts the layout in NHWC memory: oneDNN's grouped convolutions run ~2x
faster there on the dev CPU, but its GroupNorm over K*G groups 3-5x slower, so it is off by default.

The control flow mirrors `unet.UNet.forward` and `unet.ResBlock.forward` line by line and reads
every hyper-parameter (strides, paddings, group counts, eps) from the template module, so the
two cannot silently disagree; tests/test_stacked.py checks them against separate runs.
Self-attention is not written here: a config with `attention=True` uses the vmap path.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import ResBlock, UNet, sinusoidal_embedding


class GroupedForward:
    """Call with stacked params {name: (K, *shape)}, x_t (K, B, C, H, W), t (K, B)."""

    def __init__(self, template: UNet, channels_last: bool):
        if template.mid_attn is not None:
            raise ValueError("the grouped stacked forward does not implement self-attention; use the vmap path")
        self.net, self.channels_last = template, channels_last

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                 dropout: Callable[[torch.Tensor, float], torch.Tensor] | None) -> torch.Tensor:
        k, b = x.shape[:2]
        self.p, self.k, self.dropout = params, k, dropout
        net = self.net
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        temb = self._linear("time_mlp.0", sinusoidal_embedding(t.reshape(-1), net.config.base_width).view(k, b, -1))
        temb = self._linear("time_mlp.2", F.silu(temb))                        # (K, B, D)
        h = self._conv("conv_in", net.conv_in, h)
        skips = []
        for level, blocks in enumerate(net.down_blocks):
            for i, block in enumerate(blocks):
                h = self._resblock(f"down_blocks.{level}.{i}", block, h, temb)
            if level < len(net.downsamples):
                skips.append(h)
                h = self._conv(f"downsamples.{level}", net.downsamples[level], h)
        for i, block in enumerate(net.mid_blocks):
            h = self._resblock(f"mid_blocks.{i}", block, h, temb)
        for j, (upsample, blocks) in enumerate(zip(net.upsamples, net.up_blocks)):
            h = self._cat(self._conv_transpose(f"upsamples.{j}", upsample, h), skips.pop())
            for i, block in enumerate(blocks):
                h = self._resblock(f"up_blocks.{j}.{i}", block, h, temb)
        h = self._conv("conv_out", net.conv_out, F.silu(self._norm("norm_out", net.norm_out, h)))
        return h.reshape(b, k, -1, *h.shape[2:]).transpose(0, 1)

    # ------------------------------------------------------------ member-wise ops
    def _resblock(self, name: str, block: ResBlock, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._conv(f"{name}.conv1", block.conv1, F.silu(self._norm(f"{name}.norm1", block.norm1, x)))
        proj = self._linear(f"{name}.temb_proj", temb)                          # (K, B, C)
        h = h + proj.transpose(0, 1).reshape(h.shape[0], -1)[:, :, None, None]
        h = F.silu(self._norm(f"{name}.norm2", block.norm2, h))
        if self.dropout is not None and block.dropout.p > 0:
            h = self.dropout(h, block.dropout.p)
        h = self._conv(f"{name}.conv2", block.conv2, h)
        skip = x if isinstance(block.skip, nn.Identity) else self._conv(f"{name}.skip", block.skip, x)
        return skip + h

    def _w(self, name: str) -> torch.Tensor:
        return self.p[name]

    def _conv(self, name: str, m: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        w = self._w(f"{name}.weight")
        w = w.reshape(-1, *w.shape[2:])
        if self.channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(h, w, self._w(f"{name}.bias").reshape(-1), m.stride, m.padding, m.dilation, self.k)

    def _conv_transpose(self, name: str, m: nn.ConvTranspose2d, h: torch.Tensor) -> torch.Tensor:
        w = self._w(f"{name}.weight")                                          # (K, C_in, C_out, kh, kw)
        return F.conv_transpose2d(h, w.reshape(-1, *w.shape[2:]), self._w(f"{name}.bias").reshape(-1), m.stride,
                                  m.padding, m.output_padding, self.k, m.dilation)

    def _norm(self, name: str, m: nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
        return F.group_norm(h, self.k * m.num_groups, self._w(f"{name}.weight").reshape(-1),
                            self._w(f"{name}.bias").reshape(-1), m.eps)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(K, B, in) -> (K, B, out), member k with its own weight."""
        return torch.baddbmm(self._w(f"{name}.bias")[:, None, :], x, self._w(f"{name}.weight").transpose(1, 2))

    def _cat(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Each member's torch.cat([up, skip], dim=1)."""
        b, k = up.shape[0], self.k
        h = torch.cat([up.reshape(b, k, -1, *up.shape[2:]), skip.reshape(b, k, -1, *skip.shape[2:])], dim=2)
        h = h.reshape(b, -1, *h.shape[3:])
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last else h

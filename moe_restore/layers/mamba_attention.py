"""Mamba-Style Attention: M2IR's token mixer, a sigmoid-gated selective scan over a feature map.

For x [B, C, H, W], with E = expand * C:

    u, z  = in_proj(x)                          1x1 conv C -> 2E
    u     = SiLU(depthwise_conv_{k x k}(u))
    per direction i (1 -> row; 2 -> row, row reversed; 4 -> also column, column reversed):
        f_i, Bm_i, Cm_i = selective projections of u (f_i through a rank-r bottleneck)
        y_i = gated_scan_2d(u, f_i, Bm_i, Cm_i, order_i, d_skip=d_i)
    out   = out_proj(LayerNorm(sum_i y_i) * sigmoid(z))   1x1 conv E -> C

The decay a = sigmoid(f) depends on each token and channel, so the network can keep a degraded
token out of the state (a -> 1) while others write into it; sigmoid(z) modulates each pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_restore.kernels.validation import check_backend, check_positive_int
from moe_restore.kernels import ORDERS, gated_scan_2d

DIRECTIONS = (1, 2, 4)
INITIAL_DECAY = (0.8, 0.99)  # a = sigmoid(f) at initialisation: memories of ~5 to ~100 tokens


class MambaStyleAttention(nn.Module):
    """Sigmoid-gated selective scan over a [B, dim, H, W] feature map, in ``directions`` orders.

    Args:
        dim: channels of the input and output.
        d_state: state size N of the scan.
        expand: the scan runs on ``expand * dim`` channels.
        directions: 1 (row), 2 (row, row reversed) or 4 (row, row reversed, col, col reversed).
        d_conv: odd kernel size of the depthwise convolution before the scan.
        backend: passed to ``gated_scan_2d`` ("triton", "torch" or None).
    """

    def __init__(self, dim: int, *, d_state: int = 16, expand: int = 2, directions: int = 4,
                 d_conv: int = 3, backend: str | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("d_state", d_state), ("expand", expand), ("d_conv", d_conv)):
            check_positive_int(name, value)
        if directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (same-size padding), got {d_conv}")
        inner = expand * dim
        self.dim, self.d_state, self.inner = dim, d_state, inner
        self.rank = math.ceil(dim / 16)  # the decay's low-rank bottleneck, as Mamba's dt_rank
        # (visit, reverse) per direction: row, row backwards, column, column backwards
        self.orders = tuple((order, reverse) for order in ORDERS for reverse in (False, True))[:directions]
        self.backend = check_backend(backend)

        self.in_proj = nn.Conv2d(dim, 2 * inner, 1)
        self.conv = nn.Conv2d(inner, inner, d_conv, padding=d_conv // 2, groups=inner)
        self.x_proj = nn.Linear(inner, directions * (self.rank + 2 * d_state), bias=False)
        self.decay_weight = nn.Parameter(torch.empty(directions, self.rank, inner))
        self.decay_bias = nn.Parameter(torch.empty(directions, inner))
        self.d_skip = nn.Parameter(torch.ones(directions, inner))
        self.norm = nn.LayerNorm(inner)
        self.out_proj = nn.Conv2d(inner, dim, 1)
        self.reset_decay()

    def reset_decay(self) -> None:
        """Initialise the decay projection: logits start at logit(a), a uniform in INITIAL_DECAY."""
        bound = self.rank ** -0.5
        nn.init.uniform_(self.decay_weight, -bound, bound)
        with torch.no_grad():
            self.decay_bias.copy_(torch.logit(torch.empty_like(self.decay_bias).uniform_(*INITIAL_DECAY)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}, H, W], got {tuple(x.shape)}")
        u, z = self.in_proj(x).chunk(2, dim=1)
        # channels-last once, so that every direction's scan reads u without a copy
        u = F.silu(self.conv(u)).permute(0, 2, 3, 1).contiguous()
        batch, height, width, _ = u.shape
        selective = self.x_proj(u).view(batch, height, width, len(self.orders), -1)
        low_rank, b_all, c_all = selective.split([self.rank, self.d_state, self.d_state], dim=-1)

        y = None
        for i, (order, reverse) in enumerate(self.orders):
            # (under autocast the float32 bias would promote the logits past u's dtype)
            decay_logits = (low_rank[..., i, :] @ self.decay_weight[i] + self.decay_bias[i]).to(u.dtype)
            scanned = gated_scan_2d(u, decay_logits, b_all[..., i, :], c_all[..., i, :], order=order,
                                    reverse=reverse, d_skip=self.d_skip[i], backend=self.backend)
            y = scanned if y is None else y + scanned
        y = self.norm(y) * torch.sigmoid(z.permute(0, 2, 3, 1))
        return self.out_proj(y.permute(0, 3, 1, 2))

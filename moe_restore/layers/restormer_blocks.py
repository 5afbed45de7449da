"""Restormer-style building blocks on [B, C, H, W] feature maps.

* ``LayerNorm2d``: LayerNorm over channels at each pixel (with bias).
* ``GatedDconvFFN``: y = W_o (GELU(D_1 W_1 x) * D_2 W_2 x), W 1x1 convs, D depthwise 3x3 convs,
  hidden width ``expansion`` * C.
* ``TransposedAttention`` (multi-Dconv head transposed attention): per head, q, k, v are C_h x HW
  maps; attention is across channels, A = softmax(tau * q_hat k_hat^T) with q_hat, k_hat
  L2-normalised over pixels and tau a learned per-head temperature; y = W_o (A v). Cost is linear
  in H W.
* ``TransformerBlock``: x = x + Attn(LN(x)); x = x + FFN(LN(x)) for any token mixer ``Attn``
  (transposed attention in the decoder, Mamba-Style Attention in the MST blocks).
* ``Downsample`` / ``Upsample``: conv3x3 (C -> C/2) + PixelUnshuffle(2), conv3x3 (C -> 2C) +
  PixelShuffle(2): the channel count doubles going down and halves going up.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of [B, C, H, W]."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedDconvFFN(nn.Module):
    """Gated depthwise-conv feed-forward network (see the module docstring)."""

    def __init__(self, dim: int, expansion: float = 2.66):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.project_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransposedAttention(nn.Module):
    """Multi-Dconv head transposed (channel) self-attention (see the module docstring)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim)
        self.project_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attention = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attention @ v).reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + mixer(LN(x)), then x + GatedDconvFFN(LN(x))."""

    def __init__(self, dim: int, mixer: nn.Module, ffn_expansion: float = 2.66):
        super().__init__()
        self.norm1, self.mixer = LayerNorm2d(dim), mixer
        self.norm2, self.ffn = LayerNorm2d(dim), GatedDconvFFN(dim, ffn_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Module):
    """conv3x3 (C -> C/2) + PixelUnshuffle(2): [B, C, H, W] -> [B, 2C, H/2, W/2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """conv3x3 (C -> 2C) + PixelShuffle(2): [B, C, H, W] -> [B, C/2, 2H, 2W]."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

"""Pixels as tokens: a token layer [..., C] applied to every pixel of a feature map [B, C, H, W]."""
from __future__ import annotations

from typing import Callable

import torch

from moe_restore.kernels.validation import check_float


def pixel_tokens(x: torch.Tensor) -> torch.Tensor:
    """The pixels of a feature map x [B, C, H, W] as tokens, the view [B, H, W, C]."""
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    return x.movedim(1, -1)


def per_pixel(forward: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """Apply a token layer's ``forward`` to every pixel of x [B, C, H, W] -> [B, C_out, H, W]."""
    return forward(pixel_tokens(x), *args).movedim(-1, 1)

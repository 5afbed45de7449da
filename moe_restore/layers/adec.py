"""ADEC: Adaptive Degradation Expert Collaboration, with DGEA aggregation.

For a feature map x [B, C, H, W] and a per-image degradation context c [B, P], at each pixel t
of image b, with u = LN(x)[b, :, t]:

    logits_t = W_r [u ; W_c c_b] + b_r                       (router over features and context)
    (w_t, e_t) = top-K of softmax(logits_t), renormalised    (``topk_route``)
    out_t = x_t + sum_k w_tk Expert_{e_tk}(u) + Shared(u)    (DGEA)

Expert_e(u) = W2_e GELU(W1_e u + b1_e) + b2_e are pointwise MLPs run together by ``moe_mlp``;
Shared is one more pointwise MLP that every pixel uses. The router's linear map over the
concatenation is computed as W_x u + (W_c' c_b) (the same map, without materialising the
concatenated [B*H*W, C + P'] tensor).

After each forward, ``aux_loss`` holds the Switch load-balancing loss E * sum_e f_e P_e, with f_e
the fraction of the T*K assignments given to expert e and P_e the mean router probability of e;
it is 1 for perfectly balanced routing and is differentiable through P_e.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe_restore.kernels import moe_mlp, topk_route
from moe_restore.layers._experts import balance_loss
from moe_restore.layers.restormer_blocks import LayerNorm2d


def switch_balance_loss(logits: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e for router logits [T, E] and chosen experts [T, K]."""
    flat = experts.reshape(-1)
    # A scatter-add, not bincount: bincount reads its maximum back to the host on a GPU.
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    return balance_loss(logits.float().softmax(dim=-1).mean(dim=0), counts, max(experts.numel(), 1))


class ADEC(nn.Module):
    """Top-K degradation experts plus a shared expert, routed per pixel (see the module docstring).

    Args:
        dim: channels C of the feature map.
        context_dim: size P of the per-image degradation context.
        num_experts: E; top_k: K experts per pixel.
        expansion: expert hidden width = ``expansion`` * C.
        context_proj: width P' of the context projection fed to the router.
        backend: kernel backend of ``topk_route`` / ``moe_mlp`` (None: the backend rule).
    """

    def __init__(self, dim: int, context_dim: int, *, num_experts: int = 6, top_k: int = 2,
                 expansion: float = 2.66, context_proj: int = 64, backend: str | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        hidden = int(dim * expansion)
        self.num_experts, self.top_k, self.backend = num_experts, top_k, backend
        self.norm = LayerNorm2d(dim)
        self.context_proj = nn.Sequential(nn.Linear(context_dim, context_proj), nn.GELU())
        self.router_features = nn.Linear(dim, num_experts)
        self.router_context = nn.Linear(context_proj, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.shared = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context.dim() != 2 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape [B={x.shape[0]}, P], got {tuple(context.shape)}")
        b, c, h, w = x.shape
        u = self.norm(x)
        tokens = u.permute(0, 2, 3, 1).reshape(b * h * w, c)
        context_logits = self.router_context(self.context_proj(context.to(x.dtype)))  # [B, E]
        logits = (self.router_features(tokens).view(b, h * w, -1) + context_logits[:, None]).reshape(b * h * w, -1)
        routing = topk_route(logits, self.top_k, backend=self.backend)
        experts = moe_mlp(tokens, routing, self.w1, self.w2, self.b1, self.b2, activation="gelu", backend=self.backend)
        self.aux_loss = switch_balance_loss(logits, routing.experts, self.num_experts)
        return x + experts.view(b, h, w, c).permute(0, 3, 1, 2) + self.shared(u)

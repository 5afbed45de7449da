"""ADEC: Adaptive Degradation Expert Collaboration, with DGEA aggregation.

For a feature map x [B, C, H, W] and a per-image degradation context c [B, P], at each pixel t
of image b, with u = LN(x)[b, :, t]:

    logits_t = W_r [u ; GELU(W_c c_b + b_c)] + b_r           (router over features and context)
    (w_t, e_t) = top-K of softmax(logits_t), renormalised    (``topk_route``)
    out_t = x_t + sum_k w_tk Expert_{e_tk}(u) + Shared(u)    (DGEA)

that is, norm + ``MoE(TopKRouter, experts, shared expert)`` + residual, with the projected context
as the router's context. Expert_e(u) = W2_e GELU(W1_e u + b1_e) + b2_e are pointwise MLPs; Shared
is a ``DenseMLP`` of the same shape, which every pixel uses. The experts start as W ~ N(0, 1/fan_in) with zero biases;
the router's blocks and the shared expert as ``nn.Linear`` layers start.

``run`` returns the output with the MoE's ``MoERecord`` (routing and losses) and keeps nothing;
``forward`` keeps that record as its MoE's ``last_record``, so that after a forward ``aux_loss``
is the router's load-balancing loss E * sum_e f_e P_e (1 for perfectly balanced routing,
differentiable through P_e; see ``routers``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .experts import DenseMLP, ExpertMLPs
from .moe import MoE, MoERecord
from .pixels import pixel_tokens
from .restormer_blocks import LayerNorm2d
from .routers import TopKRouter


class ADEC(nn.Module):
    """Top-K degradation experts plus a shared expert, routed per pixel (see the module docstring).

    Args:
        dim: channels C of the feature map.
        context_dim: size P of the per-image degradation context.
        num_experts: E; top_k: K experts per pixel.
        expansion: expert hidden width = ``expansion`` * C.
        context_proj: width P' of the context projection fed to the router.
        backend: kernel backend of the routing and the experts (None: the backend rule).

    Children: ``norm``, ``context_proj`` (Linear(P, P') + GELU) and ``moe`` (router
    ``TopKRouter(C, E, K, context_dim=P', bias=True)``, ``experts``, ``shared_expert``).
    """

    def __init__(self, dim: int, context_dim: int, *, num_experts: int = 6, top_k: int = 2,
                 expansion: float = 2.66, context_proj: int = 64, backend: str | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        hidden = int(dim * expansion)
        self.norm = LayerNorm2d(dim)
        self.context_proj = nn.Sequential(nn.Linear(context_dim, context_proj), nn.GELU())
        router = TopKRouter(dim, num_experts, top_k, context_dim=context_proj, bias=True, backend=backend)
        router.reset_fan_in_()
        experts = ExpertMLPs(num_experts, dim, hidden, dim, activation="gelu", backend=backend)
        with torch.no_grad():
            experts.w1.normal_(0.0, 1 / math.sqrt(dim))
            experts.w2.normal_(0.0, 1 / math.sqrt(hidden))
            experts.b1.zero_()
            experts.b2.zero_()
        self.moe = MoE(router, experts, DenseMLP(dim, hidden, dim, activation="gelu"))

    @property
    def aux_loss(self) -> torch.Tensor:
        """The router's load-balancing loss of the last forward."""
        return self.moe.aux_loss

    def run(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, MoERecord]:
        """(output [B, C, H, W], the MoE's record of the call) for x [B, C, H, W] and context
        [B, P]; keeps nothing."""
        if context.dim() != 2 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape [B={x.shape[0]}, P], got {tuple(context.shape)}")
        y, record = self.moe.run(pixel_tokens(self.norm(x)), self.context_proj(context.to(x.dtype)))
        return x + y.movedim(-1, 1), record

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The output of ``run``; its record becomes ``self.moe.last_record`` (read by ``aux_loss``)."""
        out, self.moe.last_record = self.run(x, context)
        return out


"""NestedMoE: MoE-in-MoE over tokens [..., dim]; an Inter-MoE router picks expert groups and an
Intra-MoE router picks sub-experts inside each chosen group. NestedMoE2d over pixels.

For tokens x[t] of image b, with the optional per-image context c[b] (e.g. a degradation
embedding) and u[t] = [x[t] ; c[b]]:

    gl[t] = W_g u[t] + b_g  [G],   el[t] = W_e u[t] + b_e  [G*E, group major]
    routing = nested_route(gl, el, k_g, k_e)      (weights q_g * s_e|g on experts g*E + e)
    y[t] = sum over t's assignments of w * Expert_{g*E+e}(x[t]) + Shared(x[t])

The G*E expert MLPs are one expert bank in the ``moe_mlp`` layout [G*E, ...], group major.

``MoE(NestedRouter, ExpertMLPs, DenseMLP shared expert)``, assembled. The losses of each forward (``aux_loss``
balancing both levels, ``group_probs`` = softmax(gl) [..., G] for a cross-entropy against a known
degradation label: see ``routers``) are in its record, ``last_record``, and read by the properties
of the same names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .moe import MoE
from .pixels import per_pixel
from .routers import NestedRouter, check_context, check_nonnegative_int
from .topk_moe import expert_parts, upcycled


class NestedMoE(MoE):
    """Two-level mixture of ``num_groups * experts_per_group`` expert MLPs over x [..., dim].

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_groups: G expert groups; experts_per_group: E sub-experts in each.
        top_k_groups: k_g groups per token (G: the dense Inter-MoE).
        top_k_experts: k_e sub-experts per chosen group (E: dense inside the groups).
        activation: "gelu" (exact), "gelu_tanh", "silu", "swiglu" or "relu".
        num_shared_experts: S expert MLPs every token uses with weight 1: one ``DenseMLP`` of width S*H.
        group_context_dim: width of the per-image context [B, group_context_dim] that both
            routers also read (0: no context).
        bias: expert biases b1, b2.
        out_dim: output width (default: dim).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parts: ``router`` (NestedRouter: ``group_router`` ContextLinear(dim + group_context_dim, G),
    ``expert_router`` ContextLinear(dim + group_context_dim, G*E); ``num_groups``,
    ``experts_per_group``, ``top_k_groups``, ``top_k_experts``, ``context_dim``), ``experts``
    (ExpertMLPs: ``w1`` [G*E, D, H or 2H], ``w2`` [G*E, H, out_dim], ``b1``, ``b2``), ``shared_expert``
    (DenseMLP or None). After each forward:
    ``last_record``, and from it ``aux_loss``, ``group_probs`` and ``last_routing`` (with
    ``group_weights`` and ``groups``).
    """

    def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int, top_k_groups: int,
                 top_k_experts: int, *, activation: str = "gelu", num_shared_experts: int = 0,
                 group_context_dim: int = 0, bias: bool = True, out_dim: int | None = None,
                 backend: str | None = None):
        check_nonnegative_int("group_context_dim", group_context_dim)
        router = NestedRouter(dim, num_groups, experts_per_group, top_k_groups, top_k_experts,
                              context_dim=group_context_dim, backend=backend)
        super().__init__(router, *expert_parts(num_groups * experts_per_group, dim, hidden_dim,
                                               activation=activation, bias=bias,
                                               num_shared_experts=num_shared_experts, out_dim=out_dim,
                                               backend=backend))

    @classmethod
    def from_dense(cls, linear1: nn.Linear, linear2: nn.Linear, num_groups: int, experts_per_group: int,
                   top_k_groups: int, top_k_experts: int, noise_std: float = 0.0, **options) -> "NestedMoE":
        """Upcycle the dense MLP ``linear2(act(linear1(x)))``: all G*E experts start as copies of it
        (plus N(0, noise_std^2) noise on each copy's weights). With equal experts the nested weights
        q_g * s_e|g sum to 1 per token, so the layer computes the dense MLP.

        ``options`` are the constructor's keywords (activation, num_shared_experts,
        group_context_dim, backend); shared experts start with zero output.
        """
        def build(dim: int, hidden: int, out_dim: int, bias: bool) -> NestedMoE:
            return cls(dim, hidden, num_groups, experts_per_group, top_k_groups, top_k_experts, bias=bias,
                       out_dim=out_dim, **options)

        return upcycled(build, linear1, linear2, noise_std, options.get("activation", "gelu"))

    def _check_context(self, x: torch.Tensor, group_context: torch.Tensor | None) -> None:
        context_dim = self.router.context_dim
        if check_context("group_context", group_context, context_dim, "layer", x=x) and (
                x.dim() < 2 or tuple(group_context.shape) != (x.shape[0], context_dim)):
            raise ValueError(f"group_context must have shape [B, group_context_dim] = "
                             f"[{x.shape[0] if x.dim() >= 2 else 'B'}, {context_dim}] for x of shape "
                             f"[B, ..., dim] = {tuple(x.shape)}, got {tuple(group_context.shape)}")

    def forward(self, x: torch.Tensor, group_context: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] (with group_context: [B, ..., dim] and group_context [B, group_context_dim],
        one context per leading index, broadcast over its tokens) -> [..., out_dim]; its record
        becomes ``last_record``."""
        self._check_context(x, group_context)
        return super().forward(x, group_context)


class NestedMoE2d(NestedMoE):
    """NestedMoE over the pixels of x [B, dim, H, W] -> [B, out_dim, H, W]; group_context
    [B, group_context_dim] is broadcast over each image's pixels. ``group_probs`` is [B, H, W, G]."""

    def forward(self, x: torch.Tensor, group_context: torch.Tensor | None = None) -> torch.Tensor:
        return per_pixel(super().forward, x, group_context)

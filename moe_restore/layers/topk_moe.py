"""TopKMoE: a top-K mixture of expert MLPs over tokens [..., dim], and TopKMoE2d over pixels.

``MoE(TopKRouter, ExpertMLPs, DenseMLP shared expert)``, assembled. For tokens x[t] (router W_r
[E, dim], no bias):

    logits[t]       = W_r x[t]
    (w[t], e[t])    = topk_route(logits[t], k, scoring)           (renormalised over the k choices)
    y[t]            = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) + Shared(x[t])

with Shared the ``DenseMLP`` of width S*H that is the sum of ``num_shared_experts`` = S expert MLPs
of width H (see ``experts``). The losses of each forward (``aux_loss``, ``router_z_loss``: see
``routers``) are in its record, ``last_record``, and read by the properties of the same names.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .experts import DenseMLP, ExpertMLPs, dense_mlp_dims
from .moe import MoE
from .pixels import per_pixel
from .routers import TopKRouter, check_nonnegative_int


def expert_parts(num_experts: int, dim: int, hidden_dim: int, *, activation: str, bias: bool,
                 num_shared_experts: int, out_dim: int | None,
                 backend: str | None) -> tuple[ExpertMLPs, DenseMLP | None]:
    """The routed bank ``ExpertMLPs(num_experts, dim, hidden_dim, out_dim)`` (out_dim None: dim) and
    the shared expert, one ``DenseMLP`` of width num_shared_experts * hidden_dim (None for 0)."""
    out_dim = dim if out_dim is None else out_dim
    check_nonnegative_int("num_shared_experts", num_shared_experts)
    experts = ExpertMLPs(num_experts, dim, hidden_dim, out_dim, activation=activation, bias=bias, backend=backend)
    shared = (DenseMLP(dim, num_shared_experts * hidden_dim, out_dim, activation=activation, bias=bias)
              if num_shared_experts else None)
    return experts, shared


def upcycled(build: Callable[[int, int, int, bool], MoE], linear1: nn.Linear, linear2: nn.Linear,
             noise_std: float, activation: str) -> MoE:
    """``build(dim, hidden_dim, out_dim, bias)`` (a MoE layer) whose routed experts are copies of
    the dense MLP linear2(act(linear1(u))) (plus N(0, noise_std^2) noise on each copy's weights) and
    whose shared expert starts at zero output, so the layer keeps the dense function at
    initialisation (the routing weights of equal experts sum to 1). On the device and dtype of linear1."""
    dim, hidden, out_dim, bias = dense_mlp_dims(linear1, linear2, activation)
    layer = build(dim, hidden, out_dim, bias).to(device=linear1.weight.device, dtype=linear1.weight.dtype)
    layer.experts.copy_dense_(linear1, linear2, noise_std)
    if layer.shared_expert is not None:
        layer.shared_expert.zero_output_()
    return layer


class TopKMoE(MoE):
    """Top-K mixture of ``num_experts`` expert MLPs (plus shared experts) over x [..., dim]: builds
    its parts and is the ``MoE`` of them.

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_experts: E routed experts; top_k: k experts per token.
        activation: "gelu" (exact), "gelu_tanh", "silu", "swiglu" (w1 holds [gate | up], 2H columns) or "relu".
        bias: expert biases b1, b2.
        num_shared_experts: S expert MLPs every token uses with weight 1, added to the routed
            output: one ``DenseMLP`` of width S*H.
        scoring: "softmax" or "sigmoid" router scores (see ``topk_route``).
        out_dim: output width (default: dim).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parts: ``router`` (TopKRouter: ``weight`` [E, dim], no bias; ``top_k``, ``scoring``),
    ``experts`` (ExpertMLPs: ``w1`` [E, D, H or 2H], ``w2`` [E, H, out_dim], ``b1``, ``b2``, None
    without bias; ``num_experts``, ``hidden_dim``, ``activation``), ``shared_expert`` (DenseMLP:
    ``w1`` [D, S*H or 2*S*H], ``w2`` [S*H, out_dim], or None). After each forward:
    ``last_record``, and from it ``aux_loss``, ``router_z_loss`` (float32 scalars) and ``last_routing``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, activation: str = "gelu",
                 bias: bool = True, num_shared_experts: int = 0, scoring: str = "softmax", out_dim: int | None = None,
                 backend: str | None = None):
        router = TopKRouter(dim, num_experts, top_k, scoring=scoring, backend=backend)
        super().__init__(router, *expert_parts(num_experts, dim, hidden_dim, activation=activation, bias=bias,
                                               num_shared_experts=num_shared_experts, out_dim=out_dim,
                                               backend=backend))

    @classmethod
    def from_dense(cls, linear1: nn.Linear, linear2: nn.Linear, num_experts: int, top_k: int,
                   noise_std: float = 0.0, **options) -> "TopKMoE":
        """Upcycle the dense MLP ``linear2(act(linear1(x)))`` into a TopKMoE whose experts start as
        copies of it (plus N(0, noise_std^2) noise on each copy's weights). With equal experts the
        renormalised routing weights sum to 1, so the layer computes the dense MLP.

        ``options`` are the constructor's keywords (activation, scoring, num_shared_experts, backend);
        shared experts start with zero output. dim, hidden_dim, out_dim and bias come from the Linears.
        """
        def build(dim: int, hidden: int, out_dim: int, bias: bool) -> TopKMoE:
            return cls(dim, hidden, num_experts, top_k, bias=bias, out_dim=out_dim, **options)

        return upcycled(build, linear1, linear2, noise_std, options.get("activation", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., out_dim]; its record (losses, routing) becomes ``last_record``."""
        return super().forward(x)


class TopKMoE2d(TopKMoE):
    """TopKMoE over the pixels of x [B, dim, H, W] -> [B, out_dim, H, W]: each pixel's channel
    vector is a token. Same arguments, parts and losses as TopKMoE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_pixel(super().forward, x)

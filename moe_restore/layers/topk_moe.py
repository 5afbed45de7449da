"""TopKMoE: a top-K mixture of expert MLPs over tokens [..., dim], and TopKMoE2d over pixels.

``MoE(TopKRouter, ExpertMLPs, shared experts)``. For tokens x[t] (router W_r [E, dim], no bias):

    logits[t]       = W_r x[t]
    (w[t], e[t])    = topk_route(logits[t], k, scoring)           (renormalised over the k choices)
    y[t]            = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) + sum_s Shared_s(x[t])

The losses of each forward (``aux_loss``, ``router_z_loss``: see ``routers``) are in its record,
``last_record``, and read by the properties of the same names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .experts import ExpertMLPs, dense_mlp_dims
from .moe import MoE, per_pixel, rename_legacy_keys
from .routers import TopKRouter, check_nonnegative_int

# Parameter names before TopKMoE and NestedMoE were compositions (state dicts written then still load).
LEGACY_EXPERT_KEYS = {"w1": "experts.w1", "w2": "experts.w2", "b1": "experts.b1", "b2": "experts.b2",
                      "shared_experts.": "shared_expert."}


class ExpertLayer(MoE):
    """What TopKMoE and NestedMoE share: the routed bank ``experts``, the shared bank
    ``shared_expert`` (``num_shared_experts`` MLPs of the same shape, or None), upcycling, and the
    bank's parameters under their former names (``w1``, ``w2``, ``b1``, ``b2``, ``shared_experts``)."""

    def __init__(self, router_factory, dim: int, hidden_dim: int, num_experts: int, *, activation: str, bias: bool,
                 num_shared_experts: int, out_dim: int | None, backend: str | None):
        out_dim = dim if out_dim is None else out_dim
        check_nonnegative_int("num_shared_experts", num_shared_experts)
        experts = ExpertMLPs(num_experts, dim, hidden_dim, out_dim, activation=activation, bias=bias, backend=backend)
        shared = (ExpertMLPs(num_shared_experts, dim, hidden_dim, out_dim, activation=activation, bias=bias,
                             backend=backend) if num_shared_experts else None)
        super().__init__(router_factory(), experts, shared)
        self.num_shared_experts = num_shared_experts
        rename_legacy_keys(self, LEGACY_EXPERT_KEYS)

    num_experts = property(lambda self: self.experts.num_experts)
    hidden_dim = property(lambda self: self.experts.hidden_dim)
    activation = property(lambda self: self.experts.activation)
    w1 = property(lambda self: self.experts.w1)
    w2 = property(lambda self: self.experts.w2)
    b1 = property(lambda self: self.experts.b1)
    b2 = property(lambda self: self.experts.b2)
    shared_experts = property(lambda self: self.shared_expert)

    @classmethod
    def _upcycled(cls, linear1: nn.Linear, linear2: nn.Linear, noise_std: float, *layout, **options) -> "ExpertLayer":
        """``cls(dim, hidden_dim, *layout, bias=, out_dim=, **options)`` whose routed experts are
        copies of the dense MLP and whose shared experts start at zero output (so the layer keeps
        the dense function at initialisation and the shared experts learn from there). On the
        device and dtype of ``linear1``."""
        dim, hidden, out_dim, bias = dense_mlp_dims(linear1, linear2, options.get("activation", "gelu"))
        layer = cls(dim, hidden, *layout, bias=bias, out_dim=out_dim, **options)
        layer.to(device=linear1.weight.device, dtype=linear1.weight.dtype)
        layer.experts.copy_dense_(linear1, linear2, noise_std)
        if layer.shared_expert is not None:
            layer.shared_expert.zero_output_()
        return layer


class TopKMoE(ExpertLayer):
    """Top-K mixture of ``num_experts`` expert MLPs (plus shared experts) over x [..., dim].

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_experts: E routed experts; top_k: k experts per token.
        activation: "gelu" (exact), "gelu_tanh", "silu", "swiglu" (w1 holds [gate | up], 2H columns) or "relu".
        bias: expert biases b1, b2.
        num_shared_experts: expert MLPs every token uses with weight 1, added to the routed output.
        scoring: "softmax" or "sigmoid" router scores (see ``topk_route``).
        out_dim: output width (default: dim).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Children: ``router`` (TopKRouter: ``weight`` [E, dim], no bias), ``experts`` (ExpertMLPs:
    ``w1`` [E, D, H or 2H], ``w2`` [E, H, out_dim], ``b1``, ``b2``, None without bias),
    ``shared_expert`` (ExpertMLPs of the shared experts, or None). After each forward:
    ``last_record``, and from it ``aux_loss``, ``router_z_loss`` (float32 scalars) and ``last_routing``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, activation: str = "gelu",
                 bias: bool = True, num_shared_experts: int = 0, scoring: str = "softmax", out_dim: int | None = None,
                 backend: str | None = None):
        def router() -> TopKRouter:
            return TopKRouter(dim, num_experts, top_k, scoring=scoring, backend=backend)

        super().__init__(router, dim, hidden_dim, num_experts, activation=activation, bias=bias,
                         num_shared_experts=num_shared_experts, out_dim=out_dim, backend=backend)

    top_k = property(lambda self: self.router.top_k)
    scoring = property(lambda self: self.router.scoring)

    @classmethod
    def from_dense(cls, linear1: nn.Linear, linear2: nn.Linear, num_experts: int, top_k: int,
                   noise_std: float = 0.0, **options) -> "TopKMoE":
        """Upcycle the dense MLP ``linear2(act(linear1(x)))`` into a TopKMoE whose experts start as
        copies of it (plus N(0, noise_std^2) noise on each copy's weights). With equal experts the
        renormalised routing weights sum to 1, so the layer computes the dense MLP.

        ``options`` are the constructor's keywords (activation, scoring, num_shared_experts, backend);
        shared experts start with zero output. dim, hidden_dim, out_dim and bias come from the Linears.
        """
        return cls._upcycled(linear1, linear2, noise_std, num_experts, top_k, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., out_dim]; its record (losses, routing) becomes ``last_record``."""
        return super().forward(x)


class TopKMoE2d(TopKMoE):
    """TopKMoE over the pixels of x [B, dim, H, W] -> [B, out_dim, H, W]: each pixel's channel
    vector is a token. Same arguments, parameters and losses as TopKMoE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_pixel(super().forward, x)

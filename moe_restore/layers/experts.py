"""Expert banks: E two-layer MLPs in the layout of ``moe_mlp``, applied by a Routing.

    Expert_e(u) = act(u @ w1[e] + b1[e]) @ w2[e] + b2[e]
    w1 [E, D, H] (swiglu: [E, D, 2H], gate columns first), b1 [E, H or 2H], w2 [E, H, D_out], b2 [E, D_out]

Given a routing, a bank computes y[t] = sum_j w[t, j] * Expert_{e[t, j]}(x[t]); without one, every
token goes through every expert with weight 1 (a bank of shared experts). Both run through
``moe_mlp``, so one expert kernel family serves routed and shared experts, on both backends.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe_restore.kernels import Routing, moe_mlp, routing_from_topk
from moe_restore.kernels.activations import check_activation, first_layer_width
from moe_restore.kernels.validation import check_backend, check_finite_non_negative, check_positive_int


def dense_mlp_dims(linear1: nn.Linear, linear2: nn.Linear, activation: str) -> tuple[int, int, int, bool]:
    """(dim, hidden_dim, out_dim, bias) of the dense MLP linear2(act(linear1(u))) to upcycle.

    For swiglu, linear1 maps D to 2H: the first H outputs are the gate, the last H the up projection.
    """
    for name, linear in (("linear1", linear1), ("linear2", linear2)):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} must be a torch.nn.Linear, got {type(linear).__name__}")
    hidden = linear2.in_features
    expected = first_layer_width(activation, hidden)
    if linear1.out_features != expected:
        raise ValueError(f"linear2 takes {hidden} inputs, so linear1 must have {expected} outputs"
                         f"{f' (gate and up, for {activation})' if expected != hidden else ''}, "
                         f"got {linear1.out_features}")
    bias = linear1.bias is not None or linear2.bias is not None
    return linear1.in_features, hidden, linear2.out_features, bias


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    # nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def _local_shard(param: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a DTensor parameter (differentiable: its gradient becomes the DTensor's), else ``param``."""
    return param.to_local() if hasattr(param, "to_local") else param


class ExpertMLPs(nn.Module):
    """E expert MLPs in the ``moe_mlp`` layout (see the module docstring), initialised as
    ``nn.Linear`` layers are. ``forward(tokens [T, dim], routing=None) -> [T, out_dim]``."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, out_dim: int, *, activation: str = "gelu",
                 bias: bool = True, backend: str | None = None):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim),
                            ("out_dim", out_dim)):
            check_positive_int(name, value)
        check_activation(activation)
        self.num_experts, self.dim, self.hidden_dim, self.out_dim = num_experts, dim, hidden_dim, out_dim
        self.activation, self.backend = activation, check_backend(backend)
        first = first_layer_width(activation, hidden_dim)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, dim, first), dim))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden_dim, out_dim), hidden_dim))
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, first), dim)) if bias else None
        self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, out_dim), hidden_dim)) if bias else None

    def forward(self, tokens: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """sum_j w[t, j] * Expert_{e[t, j]}(tokens[t]); without a routing, sum_e Expert_e(tokens[t]).

        Weights sharded over ranks (DTensors: ``moe_restore.parallel.ExpertParallel``) are used
        through their local shard, the experts this rank holds, which the routing then addresses."""
        if routing is None:
            every = torch.arange(self.num_experts, device=tokens.device).expand(tokens.shape[0], -1)
            routing = routing_from_topk(every, torch.ones(every.shape, device=tokens.device), self.num_experts,
                                        backend=self.backend)
        w1, w2, b1, b2 = (_local_shard(p) for p in (self.w1, self.w2, self.b1, self.b2))
        return moe_mlp(tokens, routing, w1, w2, b1, b2, activation=self.activation, backend=self.backend)

    @torch.no_grad()
    def copy_dense_(self, linear1: nn.Linear, linear2: nn.Linear, noise_std: float = 0.0) -> None:
        """Make every expert a copy of the dense MLP linear2(act(linear1(u))), plus independent
        N(0, noise_std^2) noise on each copy's w1 and w2 (to break the experts' symmetry)."""
        check_finite_non_negative("noise_std", noise_std)
        self.w1.copy_(linear1.weight.t().expand_as(self.w1))
        self.w2.copy_(linear2.weight.t().expand_as(self.w2))
        if noise_std:
            for w in (self.w1, self.w2):
                w.add_(torch.randn_like(w), alpha=noise_std)
        for bias, source in ((self.b1, linear1.bias), (self.b2, linear2.bias)):
            if bias is not None:
                bias.copy_(source.expand_as(bias) if source is not None else torch.zeros_like(bias))

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero w2 and b2: every expert outputs 0 (and still receives gradients through w2)."""
        for p in (self.w2, self.b2):
            if p is not None:
                p.zero_()

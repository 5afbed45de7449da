"""What every MoE layer shares: expert MLP parameters, shared experts, tokens, balance loss, upcycling.

An expert bank holds E two-layer MLPs in the layout of ``moe_mlp``:

    Expert_e(u) = act(u @ w1[e] + b1[e]) @ w2[e] + b2[e]
    w1 [E, D, H] (swiglu: [E, D, 2H], gate columns first), b1 [E, H or 2H], w2 [E, H, D_out], b2 [E, D_out]

A layer with routing r adds the shared experts, which every token uses with weight 1:

    y[t] = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) + sum_s Shared_s(x[t])

Shared experts run through ``moe_mlp`` too, with the routing that sends every token to every
shared expert (known in advance, built without a host read): one expert kernel family
serves both, on both backends.

Load balance (Switch Transformer / GShard), for n assignments of tokens to E experts:

    balance = E * sum_e f_e * P_e,   f_e = (assignments to e) / n,   P_e = mean router probability of e

It is 1 when both the assignments and the probabilities are uniform, and differentiable through P_e.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from moe_restore.kernels import Routing, moe_mlp
from moe_restore.kernels.validation import check_float, check_positive_int
from moe_restore.kernels.activations import check_activation, first_layer_width


def every_expert_routing(num_tokens: int, num_experts: int, device: torch.device) -> Routing:
    """Every token to every expert with weight 1 (the routing of shared experts).

    Assignment a = t*E + e goes to expert e, so expert e's assignments, in increasing a, are
    e, E + e, 2E + e, ...: the transpose of the [T, E] grid of assignment ids.
    """
    ids = torch.arange(num_tokens * num_experts, device=device)
    return Routing(
        weights=torch.ones(num_tokens, num_experts, device=device),
        experts=torch.arange(num_experts, device=device).expand(num_tokens, num_experts),
        num_experts=num_experts,
        sorted_assignments=ids.view(num_tokens, num_experts).t().reshape(-1),
        expert_offsets=torch.arange(num_experts + 1, device=device) * num_tokens,
        host_offsets=tuple(e * num_tokens for e in range(num_experts + 1)),
    )


def balance_loss(mean_probs: torch.Tensor, counts: torch.Tensor, num_assignments: torch.Tensor | int) -> torch.Tensor:
    """E * sum_e f_e * P_e over the last axis: ``mean_probs`` P [.., E], ``counts`` [.., E] of the
    ``num_assignments`` [..] (a positive count; pass 1 where there were none, the counts are 0 then)."""
    if isinstance(num_assignments, torch.Tensor):
        num_assignments = num_assignments[..., None]
    fractions = counts.to(mean_probs.dtype) / num_assignments
    return mean_probs.shape[-1] * (fractions * mean_probs).sum(dim=-1)


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


class ExpertMLPs(nn.Module):
    """E expert MLPs in the ``moe_mlp`` layout (see the module docstring), applied by a Routing."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, out_dim: int, *, activation: str = "gelu",
                 bias: bool = True):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim),
                            ("out_dim", out_dim)):
            check_positive_int(name, value)
        check_activation(activation)
        self.num_experts, self.dim, self.hidden_dim, self.out_dim = num_experts, dim, hidden_dim, out_dim
        self.activation = activation
        first = first_layer_width(activation, hidden_dim)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, dim, first), dim))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden_dim, out_dim), hidden_dim))
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, first), dim)) if bias else None
        self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, out_dim), hidden_dim)) if bias else None

    def run_experts(self, tokens: torch.Tensor, routing: Routing, backend: str | None = None) -> torch.Tensor:
        """sum_j w[t, j] * Expert_{e[t, j]}(tokens[t]) for tokens [T, dim] -> [T, out_dim]."""
        return moe_mlp(tokens, routing, self.w1, self.w2, self.b1, self.b2, activation=self.activation,
                       backend=backend)

    def run_every_expert(self, tokens: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """sum_e Expert_e(tokens[t]): every token through every expert, weight 1."""
        routing = every_expert_routing(tokens.shape[0], self.num_experts, tokens.device)
        return self.run_experts(tokens, routing, backend)

    @torch.no_grad()
    def copy_dense_(self, linear1: nn.Linear, linear2: nn.Linear, noise_std: float = 0.0) -> None:
        """Make every expert a copy of the dense MLP linear2(act(linear1(u))), plus independent
        N(0, noise_std^2) noise on each copy's w1 and w2 (to break the experts' symmetry)."""
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.w1.copy_(linear1.weight.t().expand_as(self.w1))
        self.w2.copy_(linear2.weight.t().expand_as(self.w2))
        if noise_std:
            for w in (self.w1, self.w2):
                w.add_(torch.randn_like(w), alpha=noise_std)
        for bias, source in ((self.b1, linear1.bias), (self.b2, linear2.bias)):
            if bias is not None:
                bias.copy_(source.expand_as(bias) if source is not None else torch.zeros_like(bias))


class MoELayer(ExpertMLPs):
    """Base of the MoE layers: routed experts (``w1``, ``w2``, ``b1``, ``b2`` on the layer itself),
    optional shared experts (``shared_experts``, always applied) and the token layout [..., dim].

    A subclass computes a Routing for the tokens and calls :meth:`mix`.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, activation: str, bias: bool,
                 num_shared_experts: int, out_dim: int | None, backend: str | None):
        out_dim = dim if out_dim is None else out_dim
        super().__init__(num_experts, dim, hidden_dim, out_dim, activation=activation, bias=bias)
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        self.num_shared_experts, self.backend = num_shared_experts, backend
        self.shared_experts = (ExpertMLPs(num_shared_experts, dim, hidden_dim, out_dim, activation=activation,
                                          bias=bias) if num_shared_experts else None)
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: Routing | None = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] as tokens [T, dim]."""
        check_float("x", x)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., dim={self.dim}], got {tuple(x.shape)}")
        return x.reshape(-1, self.dim)

    def mix(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The routed experts' weighted outputs plus the shared experts' outputs, [T, out_dim];
        keeps ``routing`` as ``last_routing``."""
        self.last_routing = routing
        y = self.run_experts(tokens, routing, self.backend)
        if self.shared_experts is not None:
            y = y + self.shared_experts.run_every_expert(tokens, self.backend)
        return y

    @classmethod
    def _upcycled(cls, linear1: nn.Linear, linear2: nn.Linear, noise_std: float, *layout, **options) -> "MoELayer":
        """``cls(dim, hidden_dim, *layout, bias=, out_dim=, **options)`` whose routed experts are
        copies of the dense MLP and whose shared experts start at zero output (zero w2 and b2, so
        the layer keeps the dense function at initialisation and the shared experts learn from
        there). On the device and dtype of ``linear1``."""
        dim, hidden, out_dim, bias = dense_mlp_dims(linear1, linear2, options.get("activation", "gelu"))
        layer = cls(dim, hidden, *layout, bias=bias, out_dim=out_dim, **options)
        layer.to(device=linear1.weight.device, dtype=linear1.weight.dtype)
        layer.copy_dense_(linear1, linear2, noise_std)
        if layer.shared_experts is not None:
            with torch.no_grad():
                for p in (layer.shared_experts.w2, layer.shared_experts.b2):
                    if p is not None:
                        p.zero_()
        return layer


def per_pixel(forward: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """Apply a token layer's ``forward`` to every pixel of x [B, C, H, W] -> [B, C_out, H, W]."""
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    return forward(x.movedim(1, -1), *args).movedim(-1, 1)

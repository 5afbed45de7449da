"""TopKMoE: a top-K mixture of expert MLPs over tokens [..., dim], and TopKMoE2d over pixels.

For tokens x[t] (router W_r [E, dim], no bias):

    logits[t]       = W_r x[t]
    (w[t], e[t])    = topk_route(logits[t], k, scoring)           (renormalised over the k choices)
    y[t]            = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) + sum_s Shared_s(x[t])

After each forward:

    aux_loss        = E * sum_e f_e * P_e      f_e: fraction of the T*k assignments given to e,
                                              P_e: mean over tokens of the router probability of e
    router_z_loss   = mean_t logsumexp(logits[t])^2

The router probability is softmax(logits) for ``scoring="softmax"``; for ``"sigmoid"`` it is the
sigmoid scores normalised to sum to 1 over the experts (DeepSeek-V3's balance loss), so that the
balance loss is 1 at uniform routing in both cases.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_restore.kernels import Routing, topk_route
from moe_restore.kernels.validation import check_positive_int
from moe_restore.kernels.routing import SCORINGS

from ._experts import MoELayer, balance_loss, per_pixel


class TopKMoE(MoELayer):
    """Top-K mixture of ``num_experts`` expert MLPs (plus shared experts) over x [..., dim].

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_experts: E routed experts; top_k: k experts per token.
        activation: "gelu" (exact), "silu", "swiglu" (w1 holds [gate | up], 2H columns) or "relu".
        bias: expert biases b1, b2.
        num_shared_experts: expert MLPs every token uses with weight 1, added to the routed output.
        scoring: "softmax" or "sigmoid" router scores (see ``topk_route``).
        out_dim: output width (default: dim).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parameters: ``router`` (Linear(dim, E, bias=False)), ``w1`` [E, D, H or 2H], ``w2`` [E, H, out_dim],
    ``b1``, ``b2`` (None without bias), ``shared_experts`` (None without shared experts).
    After each forward: ``aux_loss``, ``router_z_loss`` (scalars, float32) and ``last_routing``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, *, activation: str = "gelu",
                 bias: bool = True, num_shared_experts: int = 0, scoring: str = "softmax", out_dim: int | None = None,
                 backend: str | None = None):
        super().__init__(dim, hidden_dim, num_experts, activation=activation, bias=bias,
                         num_shared_experts=num_shared_experts, out_dim=out_dim, backend=backend)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts = {num_experts}, got {top_k}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.top_k, self.scoring = top_k, scoring
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.router_z_loss: torch.Tensor | None = None

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

    def router_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities P of the balance loss, float32 [T, E]: softmax, or normalised sigmoid."""
        logits = logits.float()
        if self.scoring == "softmax":
            return logits.softmax(dim=-1)
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., out_dim]; sets ``aux_loss``, ``router_z_loss`` and ``last_routing``."""
        tokens = self.tokens(x)
        logits = self.router(tokens)
        routing: Routing = topk_route(logits, self.top_k, scoring=self.scoring, backend=self.backend)
        y = self.mix(tokens, routing)
        num_tokens = max(tokens.shape[0], 1)  # empty input: losses 0, not NaN
        mean_probs = self.router_probabilities(logits).sum(dim=0) / num_tokens
        self.aux_loss = balance_loss(mean_probs, routing.expert_counts(), num_tokens * self.top_k)
        self.router_z_loss = logits.float().logsumexp(dim=-1).square().sum() / num_tokens
        return y.view(*x.shape[:-1], self.out_dim)


class TopKMoE2d(TopKMoE):
    """TopKMoE over the pixels of x [B, dim, H, W] -> [B, out_dim, H, W]: each pixel's channel
    vector is a token. Same arguments, parameters and losses as TopKMoE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_pixel(super().forward, x)

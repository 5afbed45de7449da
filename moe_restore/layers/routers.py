"""Routers: a linear map of each token (and of its image's context) to logits, the routing rule
of the kernels, and the router's losses, returned together.

A router is called as ``router(tokens [T, dim], context [B, P] or None) -> (Routing, RouterLosses)``;
token t belongs to image b = t // (T / B), so the tokens of one image are consecutive.

Context-aware logits (``ContextLinear``), for a per-image context c[b] (e.g. a degradation embedding):

    logits[t] = W [x[t] ; c[b]] + bias = W_x x[t] + (W_c c[b] + bias)

computed in the second form, without building the [T, dim + P] concatenation.

Load balance (Switch Transformer / GShard), for n assignments of tokens to E experts:

    balance = E * sum_e f_e * P_e,   f_e = (assignments to e) / n,   P_e = mean router probability of e

It is 1 when both the assignments and the probabilities are uniform, and differentiable through P_e.

``TopKRouter`` (``topk_route``): aux_loss = balance over the T*k assignments, with P the softmax of
the logits (``scoring="softmax"``) or the sigmoid scores normalised to sum to 1 (``"sigmoid"``,
DeepSeek-V3's balance loss), so that it is 1 at uniform routing in both cases;
router_z_loss = mean_t logsumexp(logits[t])^2.

``NestedRouter`` (``nested_route``, G groups of E sub-experts): group_probs = softmax(gl) [T, G] and

    aux_loss = L_groups + sum_g f_g * L_g
    L_groups = G * sum_g f_g P_g       f_g: fraction of the T*k_g group choices given to g,
                                       P_g: mean over all tokens of softmax(gl)_g
    L_g      = E * sum_e f_e|g P_e|g   over the n_g tokens routed to group g:
                                       f_e|g: fraction of their n_g*k_e sub-expert choices given to e,
                                       P_e|g: their mean of softmax(el[t, g])_e

Each level is 1 when balanced (so aux_loss is 2); a group no token picks adds nothing to the
second term (f_g = 0). Every loss is float32 and 0 (not NaN) for an empty input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_restore.kernels import SCORINGS, Routing, nested_route, router_loss_stats, topk_route
from moe_restore.kernels.validation import check_backend, check_float, check_positive_int, check_same_device


@dataclass(frozen=True)
class RouterLosses:
    """What a router returns beside its Routing: ``aux_loss`` (load balance, float32 scalar),
    ``router_z_loss`` (top-k routers) and ``group_probs`` [T, G] (nested routers)."""

    aux_loss: torch.Tensor
    router_z_loss: torch.Tensor | None = None
    group_probs: torch.Tensor | None = None


def balance_loss(mean_probs: torch.Tensor, counts: torch.Tensor, num_assignments: torch.Tensor | int) -> torch.Tensor:
    """E * sum_e f_e * P_e over the last axis: ``mean_probs`` P [.., E], ``counts`` [.., E] of the
    ``num_assignments`` [..] (a positive count; pass 1 where there were none, the counts are 0 then)."""
    if isinstance(num_assignments, torch.Tensor):
        num_assignments = num_assignments[..., None]
    fractions = counts.to(mean_probs.dtype) / num_assignments
    return mean_probs.shape[-1] * (fractions * mean_probs).sum(dim=-1)


def check_nonnegative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def check_context(name: str, context: torch.Tensor | None, context_dim: int, owner: str,
                  **same_device: torch.Tensor) -> bool:
    """Raise unless ``context`` is given exactly when ``context_dim > 0`` (``owner`` built with
    ``<name>_dim``), as a float tensor on the device of ``same_device``; True when it is given."""
    if context_dim == 0:
        if context is not None:
            raise ValueError(f"{name} given, but the {owner} was built with {name}_dim=0")
        return False
    if context is None:
        raise ValueError(f"{name} [B, {context_dim}] is required (the {owner} was built with {name}_dim={context_dim})")
    check_float(name, context)
    check_same_device(**same_device, **{name: context})
    return True


class ContextLinear(nn.Linear):
    """``Linear(dim + context_dim, out_features)`` over [x[t] ; c[b]], computed as
    W_x x[t] + (W_c c[b] + bias) (see the module docstring). ``context_dim = 0``: a plain Linear.

    ``forward(tokens [T, dim], context [B, context_dim] or None) -> logits [T, out_features]``;
    the context is required exactly when ``context_dim > 0``, and T must be a multiple of B.
    """

    def __init__(self, dim: int, context_dim: int, out_features: int, *, bias: bool = True):
        check_positive_int("dim", dim)
        check_nonnegative_int("context_dim", context_dim)
        super().__init__(dim + context_dim, out_features, bias=bias)
        self.dim, self.context_dim = dim, context_dim

    def reset_fan_in_(self) -> None:
        """Initialise W_x and the bias as ``nn.Linear(dim, out)`` would and W_c as
        ``nn.Linear(context_dim, out)`` would: each block scaled by its own fan-in."""
        with torch.no_grad():
            for part, fan_in in ((self.weight[:, :self.dim], self.dim), (self.weight[:, self.dim:], self.context_dim),
                                 (self.bias, self.dim)):
                if part is not None and fan_in:
                    part.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def check_context(self, tokens: torch.Tensor, context: torch.Tensor | None) -> None:
        """Raise unless ``context`` is what this map reads: None without context, else [B, context_dim]
        on the tokens' device, with B dividing the number of tokens."""
        if check_context("context", context, self.context_dim, "router", tokens=tokens) and (
                context.dim() != 2 or context.shape[1] != self.context_dim
                or tokens.shape[0] % max(context.shape[0], 1)):
            raise ValueError(f"context must have shape [B, context_dim={self.context_dim}] with B dividing the "
                             f"{tokens.shape[0]} tokens, got {tuple(context.shape)}")

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(tokens, context)

    def logits(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """W_x x[t] + (W_c c[b] + bias), [T, out_features]."""
        self.check_context(tokens, context)
        if tokens.dtype != self.weight.dtype and not torch.is_autocast_enabled(tokens.device.type):
            raise TypeError(f"x is {tokens.dtype} but the layer's parameters are {self.weight.dtype}: convert one to "
                            f"the other (layer.to({tokens.dtype}) or x.to({self.weight.dtype})), or run under "
                            "torch.autocast")
        if context is None:
            return F.linear(tokens, self.weight, self.bias)
        images = context.shape[0]
        per_image = tokens.shape[0] // max(images, 1)
        from_tokens = F.linear(tokens, self.weight[:, :self.dim]).view(images, per_image, self.out_features)
        from_context = F.linear(context.to(self.weight.dtype), self.weight[:, self.dim:], self.bias)
        return (from_tokens + from_context[:, None]).view(tokens.shape[0], self.out_features)


class TopKRouter(ContextLinear):
    """Top-k routing of tokens to ``num_experts`` experts (``topk_route``, renormalised weights).

    Args:
        dim: token width; num_experts: E; top_k: k choices per token.
        scoring: "softmax" or "sigmoid" (see ``topk_route``).
        context_dim: width of the per-image context the router also reads (0: none).
        bias: a bias on the logits.
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parameters: ``weight`` [E, dim + context_dim], ``bias`` [E] (or None), as ``nn.Linear``.
    ``forward(tokens, context=None) -> (Routing, RouterLosses(aux_loss, router_z_loss))``;
    ``logits(tokens, context=None)`` gives the logits alone.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, scoring: str = "softmax", context_dim: int = 0,
                 bias: bool = False, backend: str | None = None):
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts = {num_experts}, got {top_k}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        super().__init__(dim, context_dim, num_experts, bias=bias)
        self.num_experts, self.top_k, self.scoring = num_experts, top_k, scoring
        self.backend = check_backend(backend)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> tuple[Routing, RouterLosses]:
        logits = self.logits(tokens, context)
        routing = topk_route(logits, self.top_k, scoring=self.scoring, backend=self.backend)
        num_tokens = max(tokens.shape[0], 1)  # empty input: losses 0, not NaN
        # Both losses' token sums in one pass over the logits (one read forward, one backward on Triton).
        prob_sums, lse_sq_sum = router_loss_stats(logits, self.scoring, backend=self.backend)
        aux_loss = balance_loss(prob_sums / num_tokens, routing.expert_counts(), num_tokens * self.top_k)
        z_loss = lse_sq_sum / num_tokens
        return routing, RouterLosses(aux_loss, router_z_loss=z_loss)


class NestedRouter(nn.Module):
    """Two-level routing (``nested_route``): k_g of G groups, then k_e of E sub-experts inside each
    chosen group, over G*E experts numbered group major.

    Args:
        dim: token width; num_groups: G; experts_per_group: E.
        top_k_groups: k_g; top_k_experts: k_e.
        context_dim: width of the per-image context both levels also read (0: none).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parameters: ``group_router`` ContextLinear(dim, context_dim, G), ``expert_router``
    ContextLinear(dim, context_dim, G*E). ``forward(tokens, context=None) -> (Routing with
    group_weights and groups, RouterLosses(aux_loss, group_probs=[T, G]))``.
    """

    def __init__(self, dim: int, num_groups: int, experts_per_group: int, top_k_groups: int, top_k_experts: int, *,
                 context_dim: int = 0, backend: str | None = None):
        super().__init__()
        self.check_layout(num_groups, experts_per_group, top_k_groups, top_k_experts)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.top_k_groups, self.top_k_experts = top_k_groups, top_k_experts
        self.num_experts, self.context_dim = num_groups * experts_per_group, context_dim
        self.backend = check_backend(backend)
        self.group_router = ContextLinear(dim, context_dim, num_groups)
        self.expert_router = ContextLinear(dim, context_dim, num_groups * experts_per_group)

    @staticmethod
    def check_layout(num_groups: int, experts_per_group: int, top_k_groups: int, top_k_experts: int) -> None:
        """Raise unless the four counts are positive ints with k_g <= G and k_e <= E."""
        for name, value in (("num_groups", num_groups), ("experts_per_group", experts_per_group),
                            ("top_k_groups", top_k_groups), ("top_k_experts", top_k_experts)):
            check_positive_int(name, value)
        if top_k_groups > num_groups:
            raise ValueError(f"top_k_groups must be <= num_groups = {num_groups}, got {top_k_groups}")
        if top_k_experts > experts_per_group:
            raise ValueError(f"top_k_experts must be <= experts_per_group = {experts_per_group}, got {top_k_experts}")

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None) -> tuple[Routing, RouterLosses]:
        group_logits = self.group_router(tokens, context)
        expert_logits = self.expert_router(tokens, context)
        routing = nested_route(group_logits, expert_logits, self.top_k_groups, self.top_k_experts,
                               backend=self.backend)
        group_probs = group_logits.float().softmax(dim=-1)
        return routing, RouterLosses(self._balance_loss(group_probs, expert_logits, routing), group_probs=group_probs)

    def _balance_loss(self, group_probs: torch.Tensor, expert_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
        """L_groups + sum_g f_g * L_g (see the module docstring), float32."""
        T, G, E = group_probs.shape[0], self.num_groups, self.experts_per_group
        num_tokens = max(T, 1)
        # n_g: each token routed to g picks k_e of g's sub-experts, so g's assignments are n_g * k_e
        # (counted from the offsets: no bincount, which reads its maximum back to the host on a GPU).
        expert_counts = routing.expert_counts().view(G, E)
        tokens_per_group = expert_counts.sum(dim=1) // self.top_k_experts
        group_loss = balance_loss(group_probs.sum(dim=0) / num_tokens, tokens_per_group,
                                  num_tokens * self.top_k_groups)
        chosen = torch.zeros_like(group_probs).scatter_(1, routing.groups, 1.0)  # [T, G]: g in S_G(t)
        sub_probs = expert_logits.float().view(T, G, E).softmax(dim=-1)
        n_g = tokens_per_group.clamp_min(1).to(group_probs.dtype)
        mean_sub_probs = (sub_probs * chosen[:, :, None]).sum(dim=0) / n_g[:, None]  # P_e|g
        inner = balance_loss(mean_sub_probs, expert_counts, n_g * self.top_k_experts)
        group_fractions = tokens_per_group.to(group_probs.dtype) / (num_tokens * self.top_k_groups)
        return group_loss + (group_fractions * inner).sum()

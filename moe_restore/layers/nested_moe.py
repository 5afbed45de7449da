"""NestedMoE: MoE-in-MoE over tokens [..., dim]; an Inter-MoE router picks expert groups and an
Intra-MoE router picks sub-experts inside each chosen group. NestedMoE2d over pixels.

For tokens x[t] of image b, with the optional per-image context c[b] (e.g. a degradation
embedding) and u[t] = [x[t] ; c[b]]:

    gl[t] = W_g u[t] + b_g  [G],   el[t] = W_e u[t] + b_e  [G*E, group major]
    routing = nested_route(gl, el, k_g, k_e)      (weights q_g * s_e|g on experts g*E + e)
    y[t] = sum over t's assignments of w * Expert_{g*E+e}(x[t]) + sum_s Shared_s(x[t])

The G*E expert MLPs are one expert bank in the ``moe_mlp`` layout [G*E, ...], group major.

After each forward, ``group_probs`` = softmax(gl) [..., G] (for a cross-entropy against a known
degradation label) and ``aux_loss`` balances both levels:

    aux_loss = L_groups + sum_g f_g * L_g
    L_groups = G * sum_g f_g P_g       f_g: fraction of the T*k_g group choices given to g,
                                       P_g: mean over all tokens of softmax(gl)_g
    L_g      = E * sum_e f_e|g P_e|g   over the n_g tokens routed to group g:
                                       f_e|g: fraction of their n_g*k_e sub-expert choices given to e,
                                       P_e|g: their mean of softmax(el[t, g])_e

Each level is 1 when balanced (so aux_loss is 2); a group no token picks adds nothing to the
second term (f_g = 0).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_restore.kernels import Routing, nested_route
from moe_restore.kernels.validation import check_float, check_positive_int, check_same_device

from ._experts import MoELayer, balance_loss, per_pixel


class NestedMoE(MoELayer):
    """Two-level mixture of ``num_groups * experts_per_group`` expert MLPs over x [..., dim].

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_groups: G expert groups; experts_per_group: E sub-experts in each.
        top_k_groups: k_g groups per token (G: the dense Inter-MoE).
        top_k_experts: k_e sub-experts per chosen group (E: dense inside the groups).
        activation: "gelu" (exact), "silu", "swiglu" or "relu".
        num_shared_experts: expert MLPs every token uses with weight 1.
        group_context_dim: width of the per-image context [B, group_context_dim] that both
            routers also read (0: no context).
        bias: expert biases b1, b2.
        out_dim: output width (default: dim).
        backend: kernel backend ("triton", "torch" or None for the backend rule).

    Parameters: ``group_router`` Linear(dim + group_context_dim, G), ``expert_router``
    Linear(dim + group_context_dim, G*E), ``w1`` [G*E, D, H or 2H], ``w2`` [G*E, H, out_dim],
    ``b1``, ``b2``, ``shared_experts``. After each forward: ``aux_loss``, ``group_probs`` and
    ``last_routing`` (with ``group_weights`` and ``groups``).
    """

    def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int, top_k_groups: int,
                 top_k_experts: int, *, activation: str = "gelu", num_shared_experts: int = 0,
                 group_context_dim: int = 0, bias: bool = True, out_dim: int | None = None,
                 backend: str | None = None):
        for name, value in (("num_groups", num_groups), ("experts_per_group", experts_per_group),
                            ("top_k_groups", top_k_groups), ("top_k_experts", top_k_experts)):
            check_positive_int(name, value)
        if top_k_groups > num_groups:
            raise ValueError(f"top_k_groups must be <= num_groups = {num_groups}, got {top_k_groups}")
        if top_k_experts > experts_per_group:
            raise ValueError(f"top_k_experts must be <= experts_per_group = {experts_per_group}, got {top_k_experts}")
        if isinstance(group_context_dim, bool) or not isinstance(group_context_dim, int) or group_context_dim < 0:
            raise ValueError(f"group_context_dim must be an int >= 0, got {group_context_dim!r}")
        super().__init__(dim, hidden_dim, num_groups * experts_per_group, activation=activation, bias=bias,
                         num_shared_experts=num_shared_experts, out_dim=out_dim, backend=backend)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.top_k_groups, self.top_k_experts = top_k_groups, top_k_experts
        self.group_context_dim = group_context_dim
        self.group_router = nn.Linear(dim + group_context_dim, num_groups)
        self.expert_router = nn.Linear(dim + group_context_dim, num_groups * experts_per_group)
        self.group_probs: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, linear1: nn.Linear, linear2: nn.Linear, num_groups: int, experts_per_group: int,
                   top_k_groups: int, top_k_experts: int, noise_std: float = 0.0, **options) -> "NestedMoE":
        """Upcycle the dense MLP ``linear2(act(linear1(x)))``: all G*E experts start as copies of it
        (plus N(0, noise_std^2) noise on each copy's weights). With equal experts the nested weights
        q_g * s_e|g sum to 1 per token, so the layer computes the dense MLP.

        ``options`` are the constructor's keywords (activation, num_shared_experts,
        group_context_dim, backend); shared experts start with zero output.
        """
        return cls._upcycled(linear1, linear2, noise_std, num_groups, experts_per_group, top_k_groups,
                             top_k_experts, **options)

    def _router_logits(self, router: nn.Linear, tokens: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """router([x[t] ; c[b]]) as W_x x[t] + (W_c c[b] + bias), without building the concatenation."""
        if context is None:
            return router(tokens)
        images = context.shape[0]
        per_image = tokens.shape[0] // max(images, 1)
        from_tokens = F.linear(tokens, router.weight[:, :self.dim]).view(images, per_image, router.out_features)
        from_context = F.linear(context.to(router.weight.dtype), router.weight[:, self.dim:], router.bias)
        return (from_tokens + from_context[:, None]).view(tokens.shape[0], router.out_features)

    def _check_context(self, x: torch.Tensor, group_context: torch.Tensor | None) -> torch.Tensor | None:
        if self.group_context_dim == 0:
            if group_context is not None:
                raise ValueError("group_context given, but the layer was built with group_context_dim=0")
            return None
        if group_context is None:
            raise ValueError(f"group_context [B, {self.group_context_dim}] is required "
                             f"(the layer was built with group_context_dim={self.group_context_dim})")
        check_float("group_context", group_context)
        check_same_device(x=x, group_context=group_context)
        if x.dim() < 2 or tuple(group_context.shape) != (x.shape[0], self.group_context_dim):
            raise ValueError(f"group_context must have shape [B, group_context_dim] = "
                             f"[{x.shape[0] if x.dim() >= 2 else 'B'}, {self.group_context_dim}] for x of shape "
                             f"[B, ..., dim] = {tuple(x.shape)}, got {tuple(group_context.shape)}")
        return group_context

    def forward(self, x: torch.Tensor, group_context: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., dim] (with group_context: [B, ..., dim] and group_context [B, group_context_dim],
        one context per leading index, broadcast over its tokens) -> [..., out_dim]."""
        tokens = self.tokens(x)
        context = self._check_context(x, group_context)
        group_logits = self._router_logits(self.group_router, tokens, context)
        expert_logits = self._router_logits(self.expert_router, tokens, context)
        routing = nested_route(group_logits, expert_logits, self.top_k_groups, self.top_k_experts,
                               backend=self.backend)
        y = self.mix(tokens, routing)
        group_probs = group_logits.float().softmax(dim=-1)
        self.group_probs = group_probs.view(*x.shape[:-1], self.num_groups)
        self.aux_loss = self._balance_loss(group_probs, expert_logits, routing)
        return y.view(*x.shape[:-1], self.out_dim)

    def _balance_loss(self, group_probs: torch.Tensor, expert_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
        """L_groups + sum_g f_g * L_g (see the module docstring), float32."""
        T, G, E = group_probs.shape[0], self.num_groups, self.experts_per_group
        num_tokens = max(T, 1)  # empty input: loss 0, not NaN
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


class NestedMoE2d(NestedMoE):
    """NestedMoE over the pixels of x [B, dim, H, W] -> [B, out_dim, H, W]; group_context
    [B, group_context_dim] is broadcast over each image's pixels. ``group_probs`` is [B, H, W, G]."""

    def forward(self, x: torch.Tensor, group_context: torch.Tensor | None = None) -> torch.Tensor:
        return per_pixel(super().forward, x, group_context)

"""The eager baselines of the MoE benchmarks, written as most model code writes an MoE layer:
a Python loop over experts that gathers each expert's tokens with index_select, runs the MLP and
adds the weighted result back with index_add (one host synchronisation per expert to size the
gather). They read the parameters of a TopKMoE / NestedMoE, so every implementation computes the
same function (up to ties in the top-k and rounding)."""
from __future__ import annotations

import torch

from moe_restore.kernels.naive import expert_mlp, stable_top_k as top_k, topk_route
from moe_restore.layers import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE


def _add_expert(y: torch.Tensor, layer, e: int, x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
    bank = layer.experts
    b1 = None if bank.b1 is None else bank.b1[e]
    b2 = None if bank.b2 is None else bank.b2[e]
    out = expert_mlp(x.index_select(0, tokens), bank.w1[e], b1, bank.w2[e], b2, bank.activation)
    y.index_add_(0, tokens, out * weights[:, None].to(out.dtype))


def eager_topk_moe(layer: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """The TopKMoE's routed experts (softmax scoring, renormalised) for tokens x [T, dim], expert by expert."""
    weights, experts = topk_route(layer.router.logits(x), layer.router.top_k)
    y = x.new_zeros(x.shape[0], layer.out_dim)
    for e in range(layer.experts.num_experts):
        tokens, slots = torch.where(experts == e)
        if tokens.numel():
            _add_expert(y, layer, e, x, tokens, weights[tokens, slots])
    return y


def eager_nested_moe(layer: NestedMoE, x: torch.Tensor) -> torch.Tensor:
    """The NestedMoE's routed experts (no context) for tokens x [T, dim]: for each group, for each
    of its sub-experts, gather, MLP, weighted add."""
    G, E = layer.router.num_groups, layer.router.experts_per_group
    group_probs = layer.router.group_router(x).float().softmax(dim=-1)
    q, groups = top_k(group_probs, layer.router.top_k_groups)
    q = q / q.sum(dim=-1, keepdim=True)
    expert_logits = layer.router.expert_router(x).view(-1, G, E)
    y = x.new_zeros(x.shape[0], layer.out_dim)
    for g in range(G):
        in_group, group_slots = torch.where(groups == g)
        if not in_group.numel():
            continue
        sub_probs = expert_logits[in_group, g].float().softmax(dim=-1)
        s, subs = top_k(sub_probs, layer.router.top_k_experts)
        s = s / s.sum(dim=-1, keepdim=True)
        group_weight = q[in_group, group_slots]
        for e in range(E):
            rows, sub_slots = torch.where(subs == e)
            if rows.numel():
                _add_expert(y, layer, g * E + e, x, in_group[rows], group_weight[rows] * s[rows, sub_slots])
    return y

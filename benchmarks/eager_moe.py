"""The eager baselines of the MoE benchmarks, written as most model code writes an MoE layer:
a Python loop over experts that gathers each expert's tokens with index_select, runs the MLP and
adds the weighted result back with index_add (one host synchronisation per expert to size the
gather), in the input's dtype with float32 router scores, torch.topk for the choice and the
library's own PyTorch activations. They read the parameters of a TopKMoE / NestedMoE, so every
implementation computes the same function (up to ties in the top-k and rounding). A baseline, not
the oracle: that is ``moe_restore.kernels.naive``, in float64."""
from __future__ import annotations

import torch

from moe_restore.kernels.activations import activate
from moe_restore.layers import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) of the k largest probabilities of each row, renormalised to sum to 1."""
    weights, indices = probs.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def _add_expert(y: torch.Tensor, layer, e: int, x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
    bank = layer.experts
    z = x.index_select(0, tokens) @ bank.w1[e]
    z = z if bank.b1 is None else z + bank.b1[e]
    out = activate(z, bank.activation) @ bank.w2[e]
    out = out if bank.b2 is None else out + bank.b2[e]
    y.index_add_(0, tokens, out * weights[:, None].to(out.dtype))


def eager_topk_moe(layer: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """The TopKMoE's routed experts (softmax scoring, renormalised) for tokens x [T, dim], expert by expert."""
    weights, experts = top_k(layer.router.logits(x).float().softmax(dim=-1), layer.router.top_k)
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
    q, groups = top_k(layer.router.group_router(x).float().softmax(dim=-1), layer.router.top_k_groups)
    expert_logits = layer.router.expert_router(x).view(-1, G, E)
    y = x.new_zeros(x.shape[0], layer.out_dim)
    for g in range(G):
        in_group, group_slots = torch.where(groups == g)
        if not in_group.numel():
            continue
        s, subs = top_k(expert_logits[in_group, g].float().softmax(dim=-1), layer.router.top_k_experts)
        group_weight = q[in_group, group_slots]
        for e in range(E):
            rows, sub_slots = torch.where(subs == e)
            if rows.numel():
                _add_expert(y, layer, g * E + e, x, in_group[rows], group_weight[rows] * s[rows, sub_slots])
    return y

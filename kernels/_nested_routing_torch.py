"""The "torch" backend of ``nested_route``: vectorised eager PyTorch, autograd by PyTorch."""
from __future__ import annotations

import torch

from ._routing_torch import renormalized, scores, top_k


def nested_scores(group_logits: torch.Tensor, expert_logits: torch.Tensor, k_groups: int, k_experts: int,
                  renormalize: bool) -> tuple[torch.Tensor, ...]:
    """(weights [T, k_g*k_e], experts [T, k_g*k_e], group_weights [T, k_g], groups [T, k_g],
    bad_rows) for group_logits [T, G] and expert_logits [T, G, E]; see ``nested_routing``."""
    T, G, E = expert_logits.shape
    p = scores(group_logits, "softmax")
    q, groups = top_k(p, k_groups)
    if renormalize:
        q = renormalized(q)
    # Only the chosen groups' expert logits are scored: [T, k_g, E].
    chosen_logits = expert_logits.gather(1, groups[:, :, None].expand(T, k_groups, E))
    r = scores(chosen_logits, "softmax")
    s, sub_experts = top_k(r, k_experts)
    if renormalize:
        s = renormalized(s)
    weights = (q[:, :, None] * s).reshape(T, k_groups * k_experts)
    experts = (groups[:, :, None] * E + sub_experts).reshape(T, k_groups * k_experts)
    bad_rows = (p.isnan().any(dim=1) | r.isnan().flatten(1).any(dim=1)
                | expert_logits.isnan().flatten(1).any(dim=1)).sum()
    return weights, experts, q, groups, bad_rows

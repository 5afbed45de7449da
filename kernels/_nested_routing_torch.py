"""The "torch" backend of ``nested_route``: vectorised eager PyTorch, autograd by PyTorch."""
from __future__ import annotations

import torch

from ._routing_torch import route


def nested_scores(group_logits: torch.Tensor, expert_logits: torch.Tensor, k_groups: int, k_experts: int,
                  renormalize: bool) -> tuple[torch.Tensor, ...]:
    """(weights [T, k_g*k_e], experts [T, k_g*k_e], group_weights [T, k_g], groups [T, k_g],
    bad_rows) for group_logits [T, G] and expert_logits [T, G, E]; see ``nested_routing``."""
    T, G, E = expert_logits.shape
    q, groups, bad_groups = route(group_logits, k_groups, "softmax", renormalize)
    # Only the chosen groups' expert logits are scored: [T, k_g, E].
    chosen_logits = expert_logits.gather(1, groups[:, :, None].expand(T, k_groups, E))
    s, sub_experts, bad_experts = route(chosen_logits, k_experts, "softmax", renormalize)
    weights = (q[:, :, None] * s).reshape(T, k_groups * k_experts)
    experts = (groups[:, :, None] * E + sub_experts).reshape(T, k_groups * k_experts)
    bad_rows = (bad_groups | bad_experts.any(dim=1) | expert_logits.isnan().flatten(1).any(dim=1)).sum()
    return weights, experts, q, groups, bad_rows

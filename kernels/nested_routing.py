"""Nested (two-level, MoE-in-MoE) routing: pick expert groups, then sub-experts inside each group.

For group logits gl [T, G] and expert logits el [T, G, E] (E sub-experts per group), per token t,
all scores in float32:

    p_g       = softmax(gl[t])_g                                          over the G groups
    S_G(t)    = the k_g largest gl[t, g] (so p_g), ties to the lower g
    q_g       = p_g / sum_{g' in S_G(t)} p_g'        (renormalize=True;  q_g = p_g otherwise)
    for each g in S_G(t):
        r_e|g = softmax(el[t, g])_e                                       over the E sub-experts
        S_E(t, g) = the k_e largest el[t, g, e] (so r_e|g), ties to the lower e
        s_e|g = r_e|g / sum_{e' in S_E(t, g)} r_e'|g (renormalize=True;  s_e|g = r_e|g otherwise)
    assignment (g, e), g in S_G(t), e in S_E(t, g): weight w = q_g * s_e|g, expert id g*E + e

Token t's k = k_g*k_e assignments are ordered group rank major, sub-expert rank minor: column
i*k_e + j of ``weights``/``experts`` is the j-th sub-expert of the i-th group. The result is a
top-K ``Routing`` over the G*E flattened experts, so the layer output

    y[t] = sum over t's assignments of w * Expert_{g*E+e}(x[t])

is exactly ``moe_mlp`` with expert weights laid out [G*E, ...] (group major). k_g = G gives the
dense Inter-MoE (every group, weighted); k_e = E likewise inside the groups. Only the chosen
groups' expert logits are scored. Choices rank the logits (float32), so no underflow of a score
changes them, and the weights are computed stably, as in ``topk_route``. A token is refused
(ValueError) when any of its logits is NaN or a score it uses is undefined (a +inf logit among the
groups or in a chosen group, or all -inf group logits, or a chosen group whose logits are all -inf).
"""
from __future__ import annotations

import torch

from . import _nested_routing_torch
from ._backend import resolve_backend
from .validation import check_bool, check_float, check_has_values, check_ndim, check_positive_int, check_same_device
from .routing import Routing, finish_routing


def _expert_logits_3d(group_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Validate both logits tensors; return expert_logits as a [T, G, E] view."""
    check_float("group_logits", group_logits)
    check_has_values("group_logits", group_logits)
    check_float("expert_logits", expert_logits)
    check_ndim("group_logits", group_logits, 2, "[T, G]")
    check_same_device(group_logits=group_logits, expert_logits=expert_logits)
    T, G = group_logits.shape
    if expert_logits.dim() == 2:
        # The output of an expert router Linear(dim, G*E): group major, like the expert weights.
        if expert_logits.shape[0] != T or expert_logits.shape[1] % G or expert_logits.shape[1] == 0:
            raise ValueError(f"expert_logits of shape [T, G*E] must have T = {T} rows and a positive "
                             f"multiple of G = {G} columns, got {tuple(expert_logits.shape)}")
        return expert_logits.view(T, G, expert_logits.shape[1] // G)
    if expert_logits.dim() != 3 or expert_logits.shape[:2] != (T, G) or expert_logits.shape[2] == 0:
        raise ValueError(f"expert_logits must have shape [T, G, E] (or [T, G*E]) with T = {T} and G = {G} "
                         f"from group_logits, got {tuple(expert_logits.shape)}")
    return expert_logits


def nested_route(group_logits: torch.Tensor, expert_logits: torch.Tensor, top_k_groups: int, top_k_experts: int,
                 *, renormalize: bool = True, backend: str | None = None) -> Routing:
    """Route each token to top_k_groups groups and top_k_experts sub-experts inside each (k_g and
    k_e of the module docstring's math).

    group_logits: [T, G]; expert_logits: [T, G, E] or, flattened group major, [T, G*E]; any float
    dtypes (read in float32, under autocast too). Returns a ``Routing`` over num_experts = G*E
    with top_k = top_k_groups*top_k_experts assignments per token (group rank major, sub-expert
    rank minor), ``group_weights`` [T, top_k_groups] (q, float32) and ``groups``
    [T, top_k_groups] int64. Gradients flow from ``weights`` and ``group_weights`` to both logits
    tensors. Refuses NaN as ``topk_route`` does. The plain
    reference is ``naive.nested_route``.
    """
    expert_logits = _expert_logits_3d(group_logits, expert_logits)
    check_bool("renormalize", renormalize)
    T, G, E = expert_logits.shape
    k_groups, k_experts = check_positive_int("top_k_groups", top_k_groups), \
        check_positive_int("top_k_experts", top_k_experts)
    if k_groups > G:
        raise ValueError(f"top_k_groups must be <= the number of groups G = {G}, got top_k_groups = {k_groups}")
    if k_experts > E:
        raise ValueError(f"top_k_experts must be <= the sub-experts per group E = {E}, "
                         f"got top_k_experts = {k_experts}")
    backend = resolve_backend(backend, group_logits.device)
    if T == 0:
        return _empty_routing(group_logits, expert_logits, k_groups, k_experts)
    if backend == "triton":
        from ._nested_routing_triton import nested_scores

        weights, experts, group_weights, groups, bad_rows = nested_scores(
            group_logits, expert_logits, k_groups, k_experts, renormalize)
    else:
        weights, experts, group_weights, groups, bad_rows = _nested_routing_torch.nested_scores(
            group_logits, expert_logits, k_groups, k_experts, renormalize)
    return finish_routing(weights, experts, bad_rows, G * E, backend, "nested router logits",
                          group_weights=group_weights, groups=groups)


def _empty_routing(group_logits: torch.Tensor, expert_logits: torch.Tensor, k_groups: int,
                   k_experts: int) -> Routing:
    device, num_experts = group_logits.device, expert_logits.shape[1] * expert_logits.shape[2]
    # Empty, but attached to the graphs of both logits so that backward reaches them.
    anchor = (group_logits.sum() + expert_logits.sum()).float() * 0

    def empty(dtype: torch.dtype, k: int) -> torch.Tensor:
        return torch.zeros(0, k, dtype=dtype, device=device)

    return Routing(empty(torch.float32, k_groups * k_experts) + anchor, empty(torch.int64, k_groups * k_experts),
                   num_experts, torch.zeros(0, dtype=torch.int64, device=device),
                   torch.zeros(num_experts + 1, dtype=torch.int64, device=device),
                   empty(torch.float32, k_groups) + anchor, empty(torch.int64, k_groups))

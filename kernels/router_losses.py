"""The token sums behind a top-k router's losses, from its logits [T, E]:

    prob_sums[e] = sum_t P_te          the balance loss's probabilities: softmax(l_t), or the
                                       sigmoid scores normalised to sum to 1 (clamped below by
                                       float32's tiny), as ``topk_route``'s scorings
    lse_sq_sum   = sum_t lse_t^2       lse_t = logsumexp(l_t): the router z-loss's numerator

both float32, the logits read in float32. The Triton backend reads the logits once in forward and
once in backward (``_router_stats_triton``); the torch backend is the plain formula. The float64
reference is ``naive.router_loss_stats``.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend
from .routing import SCORINGS
from .validation import check_float, check_ndim


def router_loss_stats(logits: torch.Tensor, scoring: str = "softmax", *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob_sums [E], lse_sq_sum []) float32 of ``logits`` [T, E], any float dtype; differentiable
    with respect to the logits. Zeros for T = 0."""
    check_float("logits", logits)
    check_ndim("logits", logits, 2, "[T, E]")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one expert column, got shape [T, 0]")
    if resolve_backend(backend, logits.device) == "triton":
        from ._router_stats_triton import router_loss_stats as triton_stats

        return triton_stats(logits, scoring == "sigmoid")
    logits = logits.float()
    if scoring == "softmax":
        probs = logits.softmax(dim=-1)
    else:
        scores = logits.sigmoid()
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return probs.sum(dim=0), logits.logsumexp(dim=-1).square().sum()

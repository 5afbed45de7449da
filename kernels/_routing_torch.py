"""The "torch" backend of the routing ops: vectorised eager PyTorch, autograd by PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bad_rows", "choice_weights", "dispatch", "route", "stable_top_k"]


def stable_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [.., k] of the k largest entries of each row, ties to the lower index: a stable
    descending sort keeps equal values in index order, which ``torch.topk`` does not promise (ties
    are common: bf16 logits, saturated sigmoids)."""
    return logits.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def choice_weights(logits: torch.Tensor, experts: torch.Tensor, scoring: str, renormalize: bool) -> torch.Tensor:
    """Float32 weights of the chosen ``experts`` from float32 ``logits``, computed stably:

        softmax, renormalised:   softmax(logits[chosen])
        softmax:                 exp(logits[chosen] - logsumexp(logits))
        sigmoid, renormalised:   softmax(log sigmoid(logits[chosen]))   (log space: no underflow)
        sigmoid:                 sigmoid(logits[chosen])
    Undefined rows (a +inf softmax logit, a best logit of -inf) come out NaN.
    """
    chosen = logits.gather(-1, experts)
    if scoring == "softmax":
        return chosen.softmax(-1) if renormalize else (chosen - logits.logsumexp(-1, keepdim=True)).exp()
    return F.logsigmoid(chosen).softmax(-1) if renormalize else chosen.sigmoid()


def bad_rows(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per row: a NaN logit, an undefined weight, or no usable score (the best logit is -inf)."""
    return (logits.isnan().any(-1) | weights.isnan().any(-1) | (logits.amax(-1) == -torch.inf))


def route(logits: torch.Tensor, k: int, scoring: str, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [.., k] float32, experts [.., k] int64, bad rows [..] bool) of ``logits`` [.., E]."""
    logits = logits.float()
    experts = stable_top_k(logits, k)  # ranked by the logits
    weights = choice_weights(logits, experts, scoring, renormalize)
    return weights, experts, bad_rows(logits, weights)


def dispatch(experts: torch.Tensor, num_experts: int, out_int32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_assignments [T*k] (assignment ids a = t*k + j, stable-sorted by expert) and
    expert_offsets [E+1] (int64, or int32 with ``out_int32``: ``torch._grouped_mm``'s group ends
    are offsets[1:] then, with no copy), from static-size ops only: offsets[e] = the number of
    sorted ids < e, found by binary search in the sorted ids (no bincount, whose size depends on
    the data)."""
    sorted_experts, sorted_assignments = torch.sort(experts.reshape(-1), stable=True)
    bounds = torch.arange(num_experts + 1, dtype=sorted_experts.dtype, device=experts.device)
    return sorted_assignments, torch.searchsorted(sorted_experts, bounds, out_int32=out_int32)

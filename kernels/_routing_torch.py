"""The "torch" backend of the routing ops: vectorised eager PyTorch, autograd by PyTorch."""
from __future__ import annotations

import torch

from .naive import stable_top_k as top_k  # the one stable top-k, ties to the lower index

__all__ = ["dispatch", "renormalized", "scores", "top_k"]


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Router probabilities in float32: softmax over experts, or an elementwise sigmoid."""
    logits = logits.float()
    return logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()


def renormalized(w: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum (guarded against an all-zero row of underflowed sigmoids)."""
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def dispatch(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_assignments [T*k] (assignment ids a = t*k + j, stable-sorted by expert) and
    expert_offsets [E+1] int64."""
    flat = experts.reshape(-1)
    sorted_assignments = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return sorted_assignments, offsets

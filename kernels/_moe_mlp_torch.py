"""The "torch" backend of ``moe_mlp``: one gather into expert order, one contiguous slice per
expert (no per-expert index_select), one combine back to tokens; autograd by PyTorch."""
from __future__ import annotations

import torch

from .activations import activate
from .routing import Routing


def moe_mlp(x: torch.Tensor, routing: Routing, offsets: tuple[int, ...], w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``moe_mlp`` for a checked routing whose expert offsets, read on the host, are ``offsets``."""
    T, k = routing.experts.shape
    order = routing.sorted_assignments
    x_sorted = x.index_select(0, order // k)
    pieces = []
    for e in range(routing.num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        z = x_sorted[lo:hi] @ w1[e]
        if b1 is not None:
            z = z + b1[e]
        out = activate(z, activation) @ w2[e]
        pieces.append(out + b2[e] if b2 is not None else out)
    out_sorted = torch.cat(pieces) if pieces else x.new_zeros(0, w2.shape[-1])
    # The weighted combine accumulates in float32 (float64 for float64 inputs).
    acc = torch.promote_types(x.dtype, torch.float32)
    scaled = out_sorted.to(acc) * routing.weights.reshape(-1)[order, None].to(acc)
    by_assignment = scaled.new_zeros(T * k, w2.shape[-1]).index_copy(0, order, scaled)
    return by_assignment.view(T, k, -1).sum(dim=1).to(x.dtype)

"""Fixed-order sums of the kernels' partial results, each read once and written once in its
output's dtype.

``sum_middle`` sums a contiguous [O, R, I] tensor over R, r = 0..R-1 in that order, in float32:

* the expert MLP's combine back to token order: y_t = sum_j rows[t*k + j] ([T, k, W] -> [T, W]);
* its weight-gradient reductions over row splits: dW_e = sum_s partial[s, e] ([1, S, E*...]);
* the gated scan's dBm and dCm over channel blocks ([1, blocks, B*L*N]).

One launch reads its input once and writes the output once in the output dtype (k*W + W elements
per token for the combine). A float32 sum in torch and a cast wrote a float32 buffer and read it
back: 2.3x those bytes in bf16 (896 B per token at D=64, k=2, where 384 are needed). A fixed order
and no atomics keep every result deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_middle_kernel(src, out, OUTER, R, INNER, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (o[:, None] < OUTER) & (i[None, :] < INNER)
    first = o.to(tl.int64) * R
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r in range(R):
        acc += tl.load(src + (first + r)[:, None] * INNER + i[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out + o.to(tl.int64)[:, None] * INNER + i[None, :], acc.to(out.dtype.element_ty), mask=mask)


def sum_middle(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous [O, R, I] tensor summed over R in float32, in order, as [O, I] in ``dtype``."""
    outer, reduced, inner = src.shape
    if reduced == 1:
        return src.view(outer, inner).to(dtype)
    out = torch.empty(outer, inner, dtype=dtype, device=src.device)
    if outer == 0 or inner == 0:
        return out
    # A memory-bound pass: 4K-element tiles, at most 1024 columns wide.
    block_i = min(1024, triton.next_power_of_2(inner))
    block_o = max(1, 4096 // block_i)
    grid = (triton.cdiv(outer, block_o), triton.cdiv(inner, block_i))
    _sum_middle_kernel[grid](src, out, outer, reduced, inner, BLOCK_O=block_o, BLOCK_I=block_i, num_warps=4)
    return out


def combine(by_assignment: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, W] rows in assignment order (a = t*k + j), contiguous -> [T, W] in ``dtype``."""
    return sum_middle(by_assignment.view(num_tokens, top_k, by_assignment.shape[-1]), dtype)


def split_partials(splits: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where a weight-gradient kernel writes its [splits, *shape] partial sums: float32, or with one
    split the gradient itself in its parameter's ``dtype`` (the kernels' stores cast), so that the
    common case on a large input writes the gradient once and sums and casts nothing."""
    return torch.empty(splits, *shape, dtype=dtype if splits == 1 else torch.float32, device=device)


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, *shape] partials -> [*shape] in ``dtype``, summed over the splits in order."""
    return sum_middle(partials.view(1, partials.shape[0], -1), dtype).view(partials.shape[1:])

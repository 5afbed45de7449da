"""Triton kernels of ``router_loss_stats`` and their autograd registration: the token sums a
router's losses need, reading the logits once in forward and once in backward.

Per token t, in float32 (l = logits[t], padded columns excluded):

    lse_t   = m_t + log sum_e exp(l_e - m_t),  m_t = max_e l_e        softmax_te = exp(l_e - lse_t)
    P_te    = softmax_te                                             ("softmax")
    P_te    = s_te / max(S_t, tiny),  s = sigmoid(l), S_t = sum_e s_te   ("sigmoid")

Forward: prob_sums[e] = sum_t P_te and lse_sq_sum = sum_t lse_t^2, as one partial per program of
``TOKENS_PER_PROGRAM`` tokens (a loop over its tiles), summed afterwards (no atomics: deterministic).

Backward, for g = dL/dprob_sums [E] and c = dL/dlse_sq_sum (d lse_t / d l_tj = softmax_tj):

    dlogits_tj = P_tj (g_j - sum_e g_e P_te) + 2 c lse_t softmax_tj                      (softmax)
    dlogits_tj = sigmoid(l_tj) sigmoid(-l_tj) (g_j - [S_t >= tiny] sum_e g_e P_te) / max(S_t, tiny)
                 + 2 c lse_t softmax_tj                                                   (sigmoid)

where the bracket is the clamp's gradient (torch's ``clamp_min`` passes it where S_t >= tiny).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import refuse_double_backward
from ._routing_triton import _block_e, _block_lanes

@triton.jit
def _token_stats(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e, SIGMOID: tl.constexpr):
    """(softmax, P, lse, S) of a [BLOCK_T, BLOCK_E] tile; padding rows read as zeros (finite), so
    that their discarded values do no inf - inf; padded columns have softmax = P = 0."""
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :] * stride_e, mask=mask,
                     other=float("-inf")).to(tl.float32)
    logits = tl.where(row_mask[:, None], logits, 0.0)
    m = tl.max(logits, axis=1)
    e = tl.exp(logits - m[:, None])
    total = tl.sum(e, axis=1)
    lse = m + tl.log(total)
    softmax = e / total[:, None]
    if SIGMOID:  # 1.1754943508222875e-38: float32's tiny, the clamp of S_t
        s = tl.where(col_mask[None, :], tl.sigmoid(logits), 0.0)
        S = tl.sum(s, axis=1)
        p = s / tl.maximum(S, 1.1754943508222875e-38)[:, None]
    else:
        S = total
        p = softmax
    return logits, softmax, p, lse, S


@triton.jit
def _router_stats_fwd_kernel(logits_ptr, prob_parts_ptr, lse_parts_ptr, T, E, stride_t, stride_e,
                             SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCKS_PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    prob_sums = tl.zeros([BLOCK_E], dtype=tl.float32)
    lse_sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(BLOCKS_PER_PROGRAM):
        rows, cols, row_mask, col_mask = _block_lanes(pid * BLOCKS_PER_PROGRAM + i, T, E, BLOCK_T, BLOCK_E)
        _, _, p, lse, _ = _token_stats(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e, SIGMOID)
        prob_sums += tl.sum(tl.where(row_mask[:, None], p, 0.0), axis=0)
        lse_sq += tl.where(row_mask, lse * lse, 0.0)
    cols = tl.arange(0, BLOCK_E)
    tl.store(prob_parts_ptr + pid.to(tl.int64) * E + cols, prob_sums, mask=cols < E)
    tl.store(lse_parts_ptr + pid, tl.sum(lse_sq, axis=0))


@triton.jit
def _router_stats_bwd_kernel(logits_ptr, dprob_ptr, dlse_ptr, dlogits_ptr, T, E, stride_t, stride_e,
                             SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows, cols, row_mask, col_mask = _block_lanes(tl.program_id(0), T, E, BLOCK_T, BLOCK_E)
    logits, softmax, p, lse, S = _token_stats(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e,
                                              SIGMOID)
    g = tl.load(dprob_ptr + cols, mask=col_mask, other=0.0)
    c = tl.load(dlse_ptr)
    gp = tl.sum(p * g[None, :], axis=1)
    if SIGMOID:
        clamped = tl.maximum(S, 1.1754943508222875e-38)
        gp = tl.where(S >= 1.1754943508222875e-38, gp, 0.0)
        ds = tl.sigmoid(logits) * tl.sigmoid(-logits) * (g[None, :] - gp[:, None]) / clamped[:, None]
    else:
        ds = p * (g[None, :] - gp[:, None])
    dlogits = ds + 2.0 * c * lse[:, None] * softmax
    ptrs = dlogits_ptr + rows[:, None] * E + cols[None, :]  # dlogits is contiguous, whatever the logits' strides
    tl.store(ptrs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# [BLOCK_T, BLOCK_E] tiles of 1024 elements at 4 warps (8 per thread): the 4K tiles of the top-k
# score kernels spill here at 4 or 8 warps on Triton 3.6 (128 x 32) or 3.9 (32 x 64 backward at
# 2K), and 1K tiles hold every padded width at <= 72 registers on both (docs/kernels.md, compile
# figures). A forward program loops over 128 tokens, so its float32 partial costs 4E/128 bytes a token.
_TILE_ELEMENTS = 1024
TOKENS_PER_PROGRAM = 128
_WARPS = 4


def _launch_shape(E: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E) of a tile for E experts."""
    block_e = _block_e(E)
    return max(1, _TILE_ELEMENTS // block_e), block_e


@torch.library.custom_op("moe_restore::router_loss_stats", mutates_args=())
def router_loss_stats(logits: torch.Tensor, sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob_sums [E], lse_sq_sum []) float32 of logits [T, E] (see the module docstring)."""
    T, E = logits.shape
    block_t, block_e = _launch_shape(E)
    blocks_per_program = max(1, TOKENS_PER_PROGRAM // block_t)
    programs = triton.cdiv(T, block_t * blocks_per_program)
    prob_parts = torch.zeros(programs, E, dtype=torch.float32, device=logits.device)
    lse_parts = torch.zeros(programs, dtype=torch.float32, device=logits.device)
    if programs:
        _router_stats_fwd_kernel[(programs,)](
            logits, prob_parts, lse_parts, T, E, logits.stride(0), logits.stride(1), SIGMOID=sigmoid,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCKS_PER_PROGRAM=blocks_per_program, num_warps=_WARPS)
    return prob_parts.sum(dim=0), lse_parts.sum()


@router_loss_stats.register_fake
def _(logits, sigmoid):
    return (logits.new_empty(logits.shape[1], dtype=torch.float32), logits.new_empty((), dtype=torch.float32))


@torch.library.custom_op("moe_restore::router_loss_stats_backward", mutates_args=())
def router_loss_stats_backward(dprob_sums: torch.Tensor, dlse_sq_sum: torch.Tensor, logits: torch.Tensor,
                               sigmoid: bool) -> torch.Tensor:
    """dL/dlogits from dL/dprob_sums and dL/dlse_sq_sum; the scores are recomputed from the logits."""
    T, E = logits.shape
    block_t, block_e = _launch_shape(E)
    dlogits = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    if T:
        _router_stats_bwd_kernel[(triton.cdiv(T, block_t),)](
            logits, dprob_sums.float().contiguous(), dlse_sq_sum.float().reshape(1), dlogits, T, E,
            logits.stride(0), logits.stride(1), SIGMOID=sigmoid, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=_WARPS)
    return dlogits


@router_loss_stats_backward.register_fake
def _(dprob_sums, dlse_sq_sum, logits, sigmoid):
    return logits.new_empty(logits.shape)


def _setup(ctx, inputs, output):
    logits, sigmoid = inputs
    ctx.save_for_backward(logits)
    ctx.sigmoid = sigmoid


def _grad(ctx, dprob_sums, dlse_sq_sum):
    (logits,) = ctx.saved_tensors
    return router_loss_stats_backward(dprob_sums, dlse_sq_sum, logits, ctx.sigmoid), None


router_loss_stats.register_autograd(_grad, setup_context=_setup)
router_loss_stats_backward.register_autograd(
    refuse_double_backward("router_loss_stats", "use backend='torch', which supports it"))

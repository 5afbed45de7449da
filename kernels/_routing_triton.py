"""Triton kernels of the routing ops and their autograd Function.

Top-K scoring, per token t over E experts (scores and their gradient in float32):

    experts[t]  = the k largest logits[t, e], ties to the lower e (k arg-max passes on the logits:
                  both scorings are monotone, and logits do not underflow)
    weights[t]  = p[t, experts[t]] / s[t],  s[t] = sum_j p[t, experts[t, j]]   (or / 1 without renormalise)
                  with p = softmax(logits[t]) or sigmoid(logits[t]), computed stably (``_choice_weights``)

Backward, with g = dL/dweights scattered onto the chosen columns (zero elsewhere): every form but
the plain sigmoid is a softmax of s = logits or s = log sigmoid(logits) (``_choice_weights_grad``):

    dL/ds = w * (g - sum_e g_e w_e),   dlogits = dL/ds (softmax)  or  dL/ds * sigmoid(-logits)
    plain sigmoid:  dlogits = g * sigmoid(logits) * sigmoid(-logits)

Dispatch metadata, shared by every router (``dispatch``): assignment a = t*k + j goes to expert
experts[t, j]; sorted_assignments lists the assignments expert by expert, in increasing a inside
an expert (a stable counting sort). Each block of BLOCK_T tokens counts its assignments per expert
and ranks each assignment among the earlier ones of its block for the same expert (an exclusive
cumulative sum of a one-hot matrix: a token picks an expert at most once); a prefix sum over
blocks then gives every assignment its final position without atomics, so the result is
deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import refuse_double_backward


def _block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _block_t(block_e: int) -> int:
    # [BLOCK_T, BLOCK_E] tiles near 4K elements (at most 128 tokens): 8K spill in the top-k forward
    # (docs/kernels.md, compile figures).
    return max(1, min(128, 4096 // block_e))


def _dispatch_block_t(block_e: int) -> int:
    # The rank kernel's cumulative sum over tokens costs more than the score kernels' row work: at
    # most 32 tokens (64 at 16 padded experts, 16 at 512); larger blocks spill
    # (docs/kernels.md, compile figures).
    return 64 if block_e <= 16 else min(32, max(16, _block_t(block_e)))


def _score_warps(block_t: int, block_e: int) -> int:
    """Warps for a score kernel's [BLOCK_T, BLOCK_E] tiles: one per 512 elements, 4 to 8; fewer
    spill, and 16 cap a thread at 128 registers and spill in the forward (docs/kernels.md, compile
    figures; the backward takes 16, ``_score_bwd_warps``)."""
    return max(4, min(8, block_t * block_e // 512))


def _score_bwd_warps(block_t: int, block_e: int, float32: bool) -> int:
    """Warps for the top-k score backward: as ``_score_warps``, but 16 for 4K-element tiles of at most
    32 or at least 256 columns, which spill at 8 (the other shapes spill at 16). float32 logits
    (``float32``) move the spills: 32-column tiles take 4 warps (8 and 16 each spill somewhere) and
    32 x 64 tiles 8 (4 and 16 spill). docs/kernels.md, compile figures."""
    if float32 and block_e in (32, 64):
        return 4 if block_e == 32 else 8
    if block_t * block_e >= 4096 and (block_e <= 32 or block_e >= 256):
        return 16
    return _score_warps(block_t, block_e)


def _score_bwd_block_t(block_e: int) -> int:
    """Tokens per block of the top-k score backward: as the forward's, but 32 at 64 padded experts,
    where 64 x 64 tiles spill on sm_80 (docs/kernels.md, compile figures)."""
    return 32 if block_e == 64 else _block_t(block_e)


@triton.jit
def _top_k_ranks(logits, valid, cols, K):
    """rank[t, e] = j if e is token t's j-th choice (j < K), else -1: the K largest logits among
    the ``valid`` columns, ties to the lower index. Ranking is on an int32 key that orders floats
    like their values (sign-magnitude bits turned two's complement; -0 is made +0 first), so that
    a -inf logit still ranks above an invalid column and a taken one ranks below both."""
    bits = (logits + 0.0).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # Below every float's key (-inf's is -2139095041): a NaN (its token is refused), then invalid
    # columns, then taken ones.
    key = tl.where(logits != logits, -2147483646, key)
    work = tl.where(valid, key, -2147483647)
    rank = tl.full(logits.shape, -1, tl.int32)
    for j in range(K):
        best = tl.argmax(work, axis=1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        rank = tl.where(hit, j, rank)
        work = tl.where(hit, -2147483647 - 1, work)
    return rank


@triton.jit
def _choice_weights(logits, valid, chosen, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(weights, bad) of a [BLOCK_T, BLOCK_E] tile of float32 logits, computed stably:

        softmax:               p = exp(l - max l) / sum_valid exp(l - max l)
        softmax, renormalised: exp(l - max l) / sum_chosen exp(l - max l)   (= softmax of the chosen)
        sigmoid:               sigmoid(l)
        sigmoid, renormalised: softmax over the chosen of log sigmoid(l)     (log space: no underflow)

    Renormalised weights are 0 off the chosen columns; softmax weights are 0 off the valid ones.
    bad[t] = 1 for a row with a NaN logit, an undefined weight (a +inf softmax logit) or no
    usable score (its best valid logit is -inf)."""
    x = tl.where(valid, logits, float("-inf"))
    best = tl.max(tl.where(x == x, x, float("-inf")), axis=1)
    if SIGMOID:
        if RENORMALIZE:
            # log sigmoid(l) = min(l, 0) - log(1 + exp(-|l|)); the chosen maximum is at the best logit
            ls = tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))
            e = tl.where(chosen, tl.exp(ls - (tl.minimum(best, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(best))))[:, None]),
                         0.0)
            w = e / tl.sum(e, axis=1)[:, None]
        else:
            w = tl.sigmoid(x)
    else:
        e = tl.where(valid, tl.exp(x - best[:, None]), 0.0)
        if RENORMALIZE:
            e = tl.where(chosen, e, 0.0)
        w = e / tl.sum(e, axis=1)[:, None]
    w = tl.where(chosen if RENORMALIZE else valid, w, 0.0)
    undefined = (logits != logits) | (w != w)
    bad = tl.max((undefined & valid).to(tl.int32), axis=1) | (best == float("-inf")).to(tl.int32)
    return tl.where(w == w, w, 0.0), bad


@triton.jit
def _choice_weights_grad(logits, w, dw, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr):
    """dL/dlogits of a tile from w (``_choice_weights``) and dw = dL/dweights on the chosen
    columns (0 elsewhere). Softmax (either form) and renormalised sigmoid weights are a softmax
    of s = l or s = log sigmoid(l): dL/ds = w (dw - sum_e dw_e w_e), and d log sigmoid(l)/dl =
    sigmoid(-l); plain sigmoid: dL/dl = dw sigmoid(l) sigmoid(-l)."""
    if SIGMOID:
        if RENORMALIZE:
            return w * (dw - tl.sum(dw * w, axis=1)[:, None]) * tl.sigmoid(-logits)
        return dw * w * tl.sigmoid(-logits)
    return w * (dw - tl.sum(dw * w, axis=1)[:, None])


@triton.jit
def _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e):
    ptrs = logits_ptr + rows[:, None] * stride_t + cols[None, :] * stride_e
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    # Padding rows get finite logits so that their (discarded) softmax does no inf - inf.
    return tl.where(row_mask[:, None], logits, 0.0)


@triton.jit
def _block_lanes(pid, T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """(rows, cols, row mask, column mask) of token block ``pid``."""
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    return rows, cols, rows < T, cols < E


@triton.jit
def _chosen_grads(experts_ptr, dweights_ptr, rows, row_mask, cols, K, first, count,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """(dw, chosen) of a [BLOCK_T, BLOCK_E] tile from choices first..first+count-1 of each row of
    the [T, K] experts and dL/dweights: dw[t, e] = dL/dweights[t, j] where experts[t, j] = e (0 on
    the columns not chosen), chosen[t, e] = e is among them."""
    dw = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    for j in range(first, first + count):
        expert = tl.load(experts_ptr + rows * K + j, mask=row_mask, other=-1)
        grad = tl.load(dweights_ptr + rows * K + j, mask=row_mask, other=0.0)
        hit = cols[None, :] == expert[:, None]
        dw = tl.where(hit, grad[:, None], dw)
        chosen = chosen | hit
    return dw, chosen


@triton.jit
def _topk_scores_fwd_kernel(logits_ptr, weights_ptr, experts_ptr, bad_rows_ptr,
                            T, E, K, stride_t, stride_e,
                            SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols, row_mask, col_mask = _block_lanes(pid, T, E, BLOCK_T, BLOCK_E)
    logits = _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e)
    valid = col_mask[None, :]
    rank = _top_k_ranks(logits, valid, cols, K)
    chosen = rank >= 0
    # A refused token (see ``_choice_weights``) is counted for the host to raise on.
    w, bad = _choice_weights(logits, valid, chosen, SIGMOID, RENORMALIZE)
    tl.store(bad_rows_ptr + pid, tl.sum(tl.where(row_mask, bad, 0), axis=0))
    out = rows[:, None] * K + rank
    out_mask = chosen & row_mask[:, None]
    tl.store(weights_ptr + out, w, mask=out_mask)
    tl.store(experts_ptr + out, (cols[None, :] + tl.zeros_like(rank)).to(tl.int64), mask=out_mask)


@triton.jit
def _topk_scores_bwd_kernel(logits_ptr, experts_ptr, dweights_ptr, dlogits_ptr,
                            T, E, K, stride_t, stride_e,
                            SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows, cols, row_mask, col_mask = _block_lanes(tl.program_id(0), T, E, BLOCK_T, BLOCK_E)
    dp, chosen = _chosen_grads(experts_ptr, dweights_ptr, rows, row_mask, cols, K, 0, K, BLOCK_T, BLOCK_E)
    # The logits are read after the choices: live through that loop they spill
    # (docs/kernels.md, compile figures).
    logits = _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_t, stride_e)
    w, _ = _choice_weights(logits, col_mask[None, :], chosen, SIGMOID, RENORMALIZE)
    dlogits = _choice_weights_grad(logits, w, dp, SIGMOID, RENORMALIZE)
    ptrs = dlogits_ptr + rows[:, None] * E + cols[None, :]  # dlogits is contiguous, whatever the logits' strides
    tl.store(ptrs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@torch.library.custom_op("moe_restore::topk_scores", mutates_args=())
def topk_scores(logits: torch.Tensor, k: int, sigmoid: bool, renormalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, experts [T, k] int64, count of tokens with NaN scores)."""
    T, E = logits.shape
    block_e = _block_e(E)
    block_t = _block_t(block_e)
    grid = (triton.cdiv(T, block_t),)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    bad_rows = torch.empty(grid[0], dtype=torch.int32, device=logits.device)
    _topk_scores_fwd_kernel[grid](logits, weights, experts, bad_rows, T, E, k,
                                  logits.stride(0), logits.stride(1), SIGMOID=sigmoid,
                                  RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
                                  num_warps=_score_warps(block_t, block_e))
    return weights, experts, bad_rows.sum(dtype=torch.int64)


@topk_scores.register_fake
def _(logits, k, sigmoid, renormalize):
    T = logits.shape[0]
    return (logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64),
            logits.new_empty((), dtype=torch.int64))


@torch.library.custom_op("moe_restore::topk_scores_backward", mutates_args=())
def topk_scores_backward(dweights: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor,
                         sigmoid: bool, renormalize: bool) -> torch.Tensor:
    """dL/dlogits from dL/dweights; the scores are recomputed from the logits."""
    T, E = logits.shape
    k = experts.shape[1]
    block_e = _block_e(E)
    block_t = _score_bwd_block_t(block_e)
    dlogits = torch.empty(T, E, dtype=logits.dtype, device=logits.device)
    _topk_scores_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits, experts, dweights.contiguous(), dlogits, T, E, k, logits.stride(0), logits.stride(1),
        SIGMOID=sigmoid, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        num_warps=_score_bwd_warps(block_t, block_e, logits.dtype == torch.float32))
    return dlogits


@topk_scores_backward.register_fake
def _(dweights, logits, experts, sigmoid, renormalize):
    return logits.new_empty(logits.shape)


def _topk_scores_setup(ctx, inputs, output):
    logits, _k, sigmoid, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.flags = (sigmoid, renormalize)
    # else autograd writes zero "gradients" of the int64 experts and count (T*k*8 bytes) before backward
    ctx.set_materialize_grads(False)


def _topk_scores_grad(ctx, dweights, _dexperts, _dbad):
    if dweights is None:  # the weights reached no loss
        return None, None, None, None
    logits, experts = ctx.saved_tensors
    return topk_scores_backward(dweights, logits, experts, *ctx.flags), None, None, None


topk_scores.register_autograd(_topk_scores_grad, setup_context=_topk_scores_setup)
topk_scores_backward.register_autograd(refuse_double_backward("topk_route", "use backend='torch', which supports it"))


@triton.jit
def _dispatch_rank_kernel(experts_ptr, rank_ptr, block_counts_ptr, T, E, K,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    choice = tl.full((BLOCK_T, BLOCK_E), -1, tl.int32)
    for j in range(K):
        expert = tl.load(experts_ptr + rows * K + j, mask=row_mask, other=-1)
        choice = tl.where(cols[None, :] == expert[:, None], j, choice)
    picked = (choice >= 0).to(tl.int32)
    earlier = tl.cumsum(picked, axis=0) - picked
    tl.store(rank_ptr + rows[:, None] * K + choice, earlier, mask=choice >= 0)
    tl.store(block_counts_ptr + pid * E + cols, tl.sum(picked, axis=0), mask=cols < E)


@triton.jit
def _dispatch_scatter_kernel(experts_ptr, rank_ptr, block_prefix_ptr, offsets_ptr, sorted_ptr,
                             A, K, E, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr):
    a = tl.program_id(0).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask = a < A
    expert = tl.load(experts_ptr + a, mask=mask, other=0)
    rank = tl.load(rank_ptr + a, mask=mask, other=0)
    block = (a // K) // BLOCK_T
    pos = tl.load(offsets_ptr + expert, mask=mask, other=0) \
        + tl.load(block_prefix_ptr + block * E + expert, mask=mask, other=0) + rank
    tl.store(sorted_ptr + pos, a, mask=mask)


@torch.library.custom_op("moe_restore::dispatch", mutates_args=())
def dispatch(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_assignments [T*k] and expert_offsets [E+1] (int64) of ``experts`` [T, k]."""
    T, k = experts.shape
    experts = experts.contiguous()
    block_e = _block_e(num_experts)
    block_t = _dispatch_block_t(block_e)
    num_blocks = triton.cdiv(T, block_t)
    rank = torch.empty(T * k, dtype=torch.int32, device=experts.device)
    block_counts = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=experts.device)
    _dispatch_rank_kernel[(num_blocks,)](experts, rank, block_counts, T, num_experts, k,
                                         BLOCK_T=block_t, BLOCK_E=block_e)
    through_block = block_counts.cumsum(0, dtype=torch.int64)
    block_prefix = through_block - block_counts
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    torch.cumsum(through_block[-1], 0, out=offsets[1:])
    sorted_assignments = torch.empty(T * k, dtype=torch.int64, device=experts.device)
    block_a = 1024
    _dispatch_scatter_kernel[(triton.cdiv(T * k, block_a),)](
        experts, rank, block_prefix, offsets, sorted_assignments, T * k, k, num_experts,
        BLOCK_T=block_t, BLOCK_A=block_a)
    return sorted_assignments, offsets


@dispatch.register_fake
def _(experts, num_experts):
    return experts.new_empty(experts.numel()), experts.new_empty(num_experts + 1)

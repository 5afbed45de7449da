"""Triton kernels of ``nested_route`` and their autograd Function.

Forward, one program per BLOCK_T tokens, each token's G group logits and G*E expert logits
read once (the expert logits as one row of G*E columns c = g*E + e, group major):

    group ranks = the k_g arg-max passes over gl[t];  p = softmax(gl[t]);  q = p / sum_{chosen} p
    for group rank i (group g_i, weight q_i):
        sub-expert ranks j = the k_e arg-max passes over the logits of group g_i's columns
        r = softmax over the columns of group g_i only (0 elsewhere);  s = r / sum_{chosen} r
        weights[t, i*k_e + j] = q_i * s_c,  experts[t, i*k_e + j] = c   (c = g_i*E + e is the id)

Backward, with dw = dL/dweights and dq_in = dL/dgroup_weights, per group rank i:

    dL/ds_c   = q_i * dw_c                       on the chosen columns c of group g_i
    dL/dq_i   = dq_in_i + sum_j dw_j * s_j
    del[t, columns of g_i] = softmax/renormalisation backward of (r, dL/ds) inside the group
    dgl[t]    = softmax/renormalisation backward of (p, dL/dq)

Unchosen groups get a zero expert-logit gradient; every gradient element is written by the
kernel (no memset). The top-k on logits, the stable weights and their gradients are the jit helpers
of ``_routing_triton``, shared with ``topk_route``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import refuse_double_backward
from ._routing_triton import (_block_e, _block_t, _choice_weights, _choice_weights_grad, _chosen_grads, _load_logits,
                              _score_warps, _top_k_ranks)


@triton.jit
def _token_block(gl_ptr, el_ptr, T, G, E, stride_gt, stride_gg, stride_et, stride_ec,
                 BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GE: tl.constexpr):
    """This program's tokens: rows, the float32 group logits [BLOCK_T, BLOCK_G] with their columns,
    and the expert logits [BLOCK_T, BLOCK_GE] with their columns c = g*E + e and groups g."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    gcols = tl.arange(0, BLOCK_G)
    gmask = gcols < G
    gl = _load_logits(gl_ptr, rows, gcols, row_mask, gmask, stride_gt, stride_gg)
    cols = tl.arange(0, BLOCK_GE)
    cmask = cols < G * E
    el = _load_logits(el_ptr, rows, cols, row_mask, cmask, stride_et, stride_ec)
    return rows, row_mask, gl, gcols, gmask, el, cols, cmask, cols // E


@triton.jit
def _group(groups_ptr, rows, row_mask, KG, i):
    """Each row's i-th chosen group, as int32: compared in int64 with the int32 column tiles, it made
    those comparisons 64-bit and the backward spilled (docs/kernels.md, compile figures)."""
    return tl.load(groups_ptr + rows * KG + i, mask=row_mask, other=0).to(tl.int32)


@triton.jit
def _nested_scores_fwd_kernel(gl_ptr, el_ptr, weights_ptr, experts_ptr, group_weights_ptr, groups_ptr,
                              bad_rows_ptr, T, G, E, KG, KE, stride_gt, stride_gg, stride_et, stride_ec,
                              RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                              BLOCK_GE: tl.constexpr):
    rows, row_mask, gl, gcols, gmask, el, cols, cmask, col_group = _token_block(
        gl_ptr, el_ptr, T, G, E, stride_gt, stride_gg, stride_et, stride_ec, BLOCK_T, BLOCK_G, BLOCK_GE)
    # A refused token (a NaN logit anywhere, or an undefined score it uses) is counted for the
    # host to raise on.
    group_rank = _top_k_ranks(gl, gmask[None, :], gcols, KG)
    q, bad = _choice_weights(gl, gmask[None, :], group_rank >= 0, False, RENORMALIZE)
    bad = bad | tl.max(((el != el) & cmask[None, :]).to(tl.int32), axis=1)
    K = KG * KE
    for i in range(KG):
        is_i = group_rank == i
        group = tl.sum(tl.where(is_i, gcols[None, :], 0), axis=1)
        q_i = tl.sum(tl.where(is_i, q, 0.0), axis=1)
        tl.store(group_weights_ptr + rows * KG + i, q_i, mask=row_mask)
        tl.store(groups_ptr + rows * KG + i, group.to(tl.int64), mask=row_mask)
        in_group = (col_group[None, :] == group[:, None]) & cmask[None, :]
        rank = _top_k_ranks(el, in_group, cols, KE)
        chosen = rank >= 0
        s, bad_i = _choice_weights(el, in_group, chosen, False, RENORMALIZE)
        bad = bad | bad_i
        out = rows[:, None] * K + i * KE + rank
        out_mask = chosen & row_mask[:, None]
        tl.store(weights_ptr + out, q_i[:, None] * s, mask=out_mask)
        tl.store(experts_ptr + out, (cols[None, :] + tl.zeros_like(rank)).to(tl.int64), mask=out_mask)
    tl.store(bad_rows_ptr + tl.program_id(0), tl.sum(tl.where(row_mask, bad, 0), axis=0))


@triton.jit
def _nested_scores_bwd_kernel(gl_ptr, el_ptr, groups_ptr, experts_ptr, dweights_ptr, dgroup_weights_ptr,
                              dgl_ptr, del_ptr, T, G, E, KG, KE, stride_gt, stride_gg, stride_et, stride_ec,
                              RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
                              BLOCK_GE: tl.constexpr):
    rows, row_mask, gl, gcols, gmask, el, cols, cmask, col_group = _token_block(
        gl_ptr, el_ptr, T, G, E, stride_gt, stride_gg, stride_et, stride_ec, BLOCK_T, BLOCK_G, BLOCK_GE)
    group_chosen = tl.zeros((BLOCK_T, BLOCK_G), tl.int1)
    for i in range(KG):
        group = _group(groups_ptr, rows, row_mask, KG, i)
        group_chosen = group_chosen | (gcols[None, :] == group[:, None])
    q, _ = _choice_weights(gl, gmask[None, :], group_chosen, False, RENORMALIZE)
    K = KG * KE
    dq = tl.zeros((BLOCK_T, BLOCK_G), tl.float32)
    del_tile = tl.zeros((BLOCK_T, BLOCK_GE), tl.float32)
    for i in range(KG):
        group = _group(groups_ptr, rows, row_mask, KG, i)
        is_group = gcols[None, :] == group[:, None]
        q_i = tl.sum(tl.where(is_group, q, 0.0), axis=1)
        in_group = (col_group[None, :] == group[:, None]) & cmask[None, :]
        dw, chosen = _chosen_grads(experts_ptr, dweights_ptr, rows, row_mask, cols, K, i * KE, KE,
                                   BLOCK_T, BLOCK_GE)
        s, _ = _choice_weights(el, in_group, chosen, False, RENORMALIZE)
        # w = q_i * s: the product rule splits dw between q_i and s.
        dq_i = tl.load(dgroup_weights_ptr + rows * KG + i, mask=row_mask, other=0.0) \
            + tl.sum(tl.where(chosen, dw * s, 0.0), axis=1)
        dq = tl.where(is_group, dq_i[:, None], dq)
        # s (hence this gradient) is 0 outside the group, so groups never overwrite each other.
        del_tile += _choice_weights_grad(el, s, dw * q_i[:, None], False, RENORMALIZE)
    dgl = _choice_weights_grad(gl, q, dq, False, RENORMALIZE)
    tl.store(dgl_ptr + rows[:, None] * G + gcols[None, :], dgl.to(dgl_ptr.dtype.element_ty),
             mask=row_mask[:, None] & gmask[None, :])
    tl.store(del_ptr + rows[:, None] * (G * E) + cols[None, :], del_tile.to(del_ptr.dtype.element_ty),
             mask=row_mask[:, None] & cmask[None, :])


def _blocks(G: int, E: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_G, BLOCK_GE). The kernels hold the group and the expert tiles with their
    selections, so a block takes half the tokens of a top-k score block, at 8 warps: the full block
    spills at 4, 8 and 16 warps (docs/kernels.md, compile figures)."""
    block_g, block_ge = _block_e(G), _block_e(G * E)
    return max(1, _block_t(max(block_g, block_ge)) // 2), block_g, block_ge


@torch.library.custom_op("moe_restore::nested_scores", mutates_args=())
def nested_scores(group_logits: torch.Tensor, expert_logits: torch.Tensor, k_groups: int, k_experts: int,
                  renormalize: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, experts, group_weights, groups, count of tokens with NaN scores) for
    group_logits [T, G] and expert_logits [T, G, E]."""
    T, G, E = expert_logits.shape
    k = k_groups * k_experts
    flat = expert_logits.reshape(T, G * E)  # a view unless the (G, E) axes cannot merge
    block_t, block_g, block_ge = _blocks(G, E)
    grid = (triton.cdiv(T, block_t),)
    device = group_logits.device
    weights = torch.empty(T, k, dtype=torch.float32, device=device)
    experts = torch.empty(T, k, dtype=torch.int64, device=device)
    group_weights = torch.empty(T, k_groups, dtype=torch.float32, device=device)
    groups = torch.empty(T, k_groups, dtype=torch.int64, device=device)
    bad_rows = torch.empty(grid[0], dtype=torch.int32, device=device)
    _nested_scores_fwd_kernel[grid](
        group_logits, flat, weights, experts, group_weights, groups, bad_rows, T, G, E, k_groups, k_experts,
        group_logits.stride(0), group_logits.stride(1), flat.stride(0), flat.stride(1),
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_GE=block_ge,
        num_warps=_score_warps(block_t, 2 * max(block_g, block_ge)))
    return weights, experts, group_weights, groups, bad_rows.sum(dtype=torch.int64)


@nested_scores.register_fake
def _(group_logits, expert_logits, k_groups, k_experts, renormalize):
    T = group_logits.shape[0]
    k = k_groups * k_experts
    new = group_logits.new_empty
    return (new(T, k, dtype=torch.float32), new(T, k, dtype=torch.int64), new(T, k_groups, dtype=torch.float32),
            new(T, k_groups, dtype=torch.int64), new((), dtype=torch.int64))


@torch.library.custom_op("moe_restore::nested_scores_backward", mutates_args=())
def nested_scores_backward(dweights: torch.Tensor, dgroup_weights: torch.Tensor, group_logits: torch.Tensor,
                           expert_logits: torch.Tensor, experts: torch.Tensor, groups: torch.Tensor,
                           k_experts: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dgroup_logits, dL/dexpert_logits); the scores are recomputed from the logits."""
    T, G, E = expert_logits.shape
    k_groups = groups.shape[1]
    flat = expert_logits.reshape(T, G * E)
    block_t, block_g, block_ge = _blocks(G, E)
    dgroup_logits = torch.empty(T, G, dtype=group_logits.dtype, device=group_logits.device)
    dexpert_logits = torch.empty(T, G * E, dtype=flat.dtype, device=flat.device)
    _nested_scores_bwd_kernel[(triton.cdiv(T, block_t),)](
        group_logits, flat, groups, experts, dweights.contiguous(), dgroup_weights.contiguous(),
        dgroup_logits, dexpert_logits, T, G, E, k_groups, k_experts,
        group_logits.stride(0), group_logits.stride(1), flat.stride(0), flat.stride(1),
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_GE=block_ge,
        num_warps=_score_warps(block_t, 2 * max(block_g, block_ge)))
    return dgroup_logits, dexpert_logits.view(T, G, E)


@nested_scores_backward.register_fake
def _(dweights, dgroup_weights, group_logits, expert_logits, experts, groups, k_experts, renormalize):
    return group_logits.new_empty(group_logits.shape), expert_logits.new_empty(expert_logits.shape)


def _nested_scores_setup(ctx, inputs, output):
    group_logits, expert_logits, _k_groups, k_experts, renormalize = inputs
    ctx.save_for_backward(group_logits, expert_logits, output[1], output[3])
    ctx.config = (k_experts, renormalize)
    # else autograd writes zero "gradients" of the int64 experts, groups and count before backward
    ctx.set_materialize_grads(False)


def _nested_scores_grad(ctx, dweights, _dexperts, dgroup_weights, _dgroups, _dbad):
    if dweights is None and dgroup_weights is None:  # neither weight reached a loss
        return None, None, None, None, None
    group_logits, expert_logits, experts, groups = ctx.saved_tensors
    # a weight that reached no loss has a zero gradient (float32, the weights' dtype and shape)
    if dweights is None:
        dweights = experts.new_zeros(experts.shape, dtype=torch.float32)
    if dgroup_weights is None:
        dgroup_weights = groups.new_zeros(groups.shape, dtype=torch.float32)
    dgroup_logits, dexpert_logits = nested_scores_backward(dweights, dgroup_weights, group_logits, expert_logits,
                                                           experts, groups, *ctx.config)
    return dgroup_logits, dexpert_logits, None, None, None


nested_scores.register_autograd(_nested_scores_grad, setup_context=_nested_scores_setup)
nested_scores_backward.register_autograd(refuse_double_backward("nested_route", "use backend='torch', which supports it"))

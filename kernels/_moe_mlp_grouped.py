"""Grouped expert-MLP path, for any width: grouped GEMMs (gather rows in, scatter rows out, fused
bias, activation and router-weight scaling) with a transient [T*k, H] hidden buffer. The math is in
``_moe_mlp_triton``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import aligned, arch_autotune
from .activations import GATED_BASE, TRITON_CODES
from ._moe_mlp_tiles import (_activation, _Dispatch, _expert_rows, _expert_tile, _hidden, _hidden_grads,
                             _load_matrix, GATED, _load_rows, _row_splits, _w1_columns, _Weights)
from ._reductions import split_partials, sum_splits

# The constexprs of no activation (the second layer's and dx's GEMMs): ACT 0 is the identity.
_NO_ACTIVATION = dict(ACT=0, LIMIT=None, ALPHA=1.0, UP_OFFSET=0.0, CLAMP_AFTER=False, INTERLEAVED=False,
                      GATE_SOFTCAP=None, UP_SOFTCAP=None)

@triton.jit
def _halves_at(ptr, rows, n, H, INTERLEAVED: tl.constexpr, ACT: tl.constexpr):
    """Addresses of the gate and up halves of hidden units n in rows of a contiguous [., W1's width]
    buffer (z, dz), width 2H for a gated ACT (the up addresses then unused otherwise), and the mask
    of the valid ones."""
    gate_cols, _ = _w1_columns(n, H, False, INTERLEAVED)
    up_cols, _ = _w1_columns(n, H, True, INTERLEAVED)
    row_start = ptr + rows[:, None] * (2 * H if ACT >= GATED else H)
    return row_start + gate_cols[None, :], row_start + up_cols[None, :]


@triton.jit
def _store_halves(ptr, rows, row_mask, n, H, gate, up, INTERLEAVED: tl.constexpr, ACT: tl.constexpr):
    """Store [rows, n] tiles of a W1-width buffer in its dtype: ``gate`` at the gate half of hidden
    units n (all of it for an ungated ACT), ``up`` at the up half (gated ACT only)."""
    gate_at, up_at = _halves_at(ptr, rows, n, H, INTERLEAVED, ACT)
    mask = row_mask[:, None] & (n[None, :] < H)
    tl.store(gate_at, gate.to(ptr.dtype.element_ty), mask=mask)
    if ACT >= GATED:
        tl.store(up_at, up.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_halves(ptr, rows, row_mask, n, H, INTERLEAVED: tl.constexpr, ACT: tl.constexpr):
    """The float32 [rows, n] tiles of a W1-width buffer that ``_store_halves`` wrote: (gate half,
    up half; zeros for an ungated ACT)."""
    gate_at, up_at = _halves_at(ptr, rows, n, H, INTERLEAVED, ACT)
    mask = row_mask[:, None] & (n[None, :] < H)
    gate = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    if ACT >= GATED:
        return gate, tl.load(up_at, mask=mask, other=0.0).to(tl.float32)
    return gate, tl.zeros(gate.shape, tl.float32)


@triton.jit
def _gate_up_product(a_ptr, rows, row_mask, K, stride_am, stride_ak, b_e, n, N, stride_bk, stride_bn,
                     bias_e, stride_biasn, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(A[rows] B_e + bias_e over the gate columns of n, the same over the up columns for a gated
    ACT, else zeros), float32 [BLOCK_M, BLOCK_N] each: the up-projection's tiles z, z_up."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    gate_cols, gate_limit = _w1_columns(n, N, False, INTERLEAVED)
    up_cols, up_limit = _w1_columns(n, N, True, INTERLEAVED)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(a_ptr, rows, row_mask, kk, K, stride_am, stride_ak)
        acc = tl.dot(a, _load_matrix(b_e, kk, K, gate_cols, gate_limit, stride_bk, stride_bn), acc)
        if ACT >= GATED:
            acc_up = tl.dot(a, _load_matrix(b_e, kk, K, up_cols, up_limit, stride_bk, stride_bn), acc_up)
    if HAS_BIAS:
        acc += tl.load(bias_e + gate_cols * stride_biasn, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if ACT >= GATED:
            acc_up += tl.load(bias_e + up_cols * stride_biasn, mask=n < N, other=0.0).to(tl.float32)[None, :]
    return acc, acc_up


@triton.jit
def _grouped_matmul_kernel(a_ptr, b_ptr, bias_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr, z_ptr,
                           N, K, E, TOPK,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_biase, stride_biasn,
                           stride_om, stride_on,
                           GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
                           CLAMP_AFTER: tl.constexpr,
                           GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr, INTERLEAVED: tl.constexpr,
                           SCALE_ROWS: tl.constexpr, STORE_Z: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row_out(p)] = scale_p * act(A[row_in(p)] B_e + bias_e) over each expert's rows p.

    row_in(p) = sorted_assignments[p] // k (GATHER_A) or p; row_out(p) = sorted_assignments[p]
    (SCATTER_OUT) or p; scale_p = w_a (SCALE_ROWS) or 1. For a gated activation (ACT >= GATED) B holds
    2N columns, gate and up (concatenated or INTERLEAVED), and out = f(gate) * up with its parameters.
    STORE_Z also stores the pre-activation z = A B_e + bias_e (both halves for a gated ACT, in B's
    column layout) at z[p], contiguous rows of B's width, in z's dtype: what the hidden-gradient
    kernel then reads (LOAD_Z) instead of recomputing it.
    """
    expert, p, row_mask, a = _expert_rows(tl.program_id(0), order_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows_in = a // TOPK if GATHER_A else p.to(tl.int64)
    rows_out = a if SCATTER_OUT else p.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = expert.to(tl.int64)
    acc, acc_up = _gate_up_product(a_ptr, rows_in, row_mask, K, stride_am, stride_ak, b_ptr + e64 * stride_be, n, N,
                                   stride_bk, stride_bn, bias_ptr + e64 * stride_biase, stride_biasn, HAS_BIAS, ACT,
                                   INTERLEAVED, BLOCK_M, BLOCK_N, BLOCK_K)
    if STORE_Z:
        _store_halves(z_ptr, p.to(tl.int64), row_mask, n, N, acc, acc_up, INTERLEAVED, ACT)
    out = _hidden(acc, acc_up, ACT, LIMIT, ALPHA, UP_OFFSET, CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
    if SCALE_ROWS:
        out *= tl.load(weights_ptr + a, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows_out[:, None] * stride_om + n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (n[None, :] < N))


@triton.jit
def _grouped_hidden_grad_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, weights_ptr, order_ptr,
                                offsets_ptr, z_ptr, h_ptr, dz_ptr, dweights_ptr,
                                D, H, DO, E, TOPK, A,
                                stride_xt, stride_xd, stride_gt, stride_gd,
                                stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                                stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2d,
                                HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                                LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
                                CLAMP_AFTER: tl.constexpr,
                                GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr, INTERLEAVED: tl.constexpr,
                                LOAD_Z: tl.constexpr, STORE_H: tl.constexpr, BLOCK_E: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For rows p of one expert and hidden columns n: recompute z = x W1 + b1 (LOAD_Z: read it from
    z [A, W1's width] in expert order, as the forward stored it) and G = g W2^T, store h [p, n]
    (STORE_H), dz [p, W1's columns of n (gate and up for a gated activation)] in expert order and
    the partial dL/dw_a = sum_n h G (+ g . b2 in column block 0) at dweights[pid_n, a]."""
    expert, start, end = _expert_tile(tl.program_id(0), offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    pid_n = tl.program_id(1)
    p = start + tl.arange(0, BLOCK_M)
    row_mask = p < end
    a = tl.load(order_ptr + p, mask=row_mask, other=0)
    tokens = a // TOPK
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e64 = expert.to(tl.int64)
    rows = p.to(tl.int64)
    if LOAD_Z:
        z, z_up = _load_halves(z_ptr, rows, row_mask, n, H, INTERLEAVED, ACT)
    else:
        z, z_up = _gate_up_product(x_ptr, tokens, row_mask, D, stride_xt, stride_xd, w1_ptr + e64 * stride_w1e, n, H,
                                   stride_w1d, stride_w1h, b1_ptr + e64 * stride_b1e, stride_b1h, HAS_B1, ACT,
                                   INTERLEAVED, BLOCK_M, BLOCK_N, BLOCK_K)
    g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    dy_b2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, DO, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        dy = _load_rows(dy_ptr, tokens, row_mask, kk, DO, stride_gt, stride_gd)
        g = tl.dot(dy, _load_matrix(w2_ptr + e64 * stride_w2e, kk, DO, n, H, stride_w2d, stride_w2h), g)
        if HAS_B2:
            b2 = tl.load(b2_ptr + e64 * stride_b2e + kk * stride_b2d, mask=kk < DO, other=0.0).to(tl.float32)
            dy_b2 += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
    h = _hidden(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET, CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
    w = tl.load(weights_ptr + a, mask=row_mask, other=0.0)
    dw = tl.sum(h * g, axis=1)
    if pid_n == 0:
        dw += dy_b2
    tl.store(dweights_ptr + pid_n.to(tl.int64) * A + a, dw, mask=row_mask)
    dz, dz_up = _hidden_grads(z, z_up, w[:, None] * g, ACT, LIMIT, ALPHA, UP_OFFSET,
                              CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
    if STORE_H:
        tl.store(h_ptr + rows[:, None] * H + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (n[None, :] < H))
    _store_halves(dz_ptr, rows, row_mask, n, H, dz, dz_up, INTERLEAVED, ACT)


@triton.jit
def _grouped_xty_kernel(x_ptr, y_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr, dbias_ptr,
                        KX, NY, E, TOPK, SPLITS,
                        stride_xm, stride_xk, stride_ym, stride_yn,
                        GATHER_X: tl.constexpr, GATHER_Y: tl.constexpr, SCALE_Y: tl.constexpr,
                        HAS_DBIAS: tl.constexpr, ACT_X: tl.constexpr, ALPHA_X: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """Float32 partials out[s, e] = sum_p act(X[row_x(p)])^T (c_p Y[row_y(p)]) over part s of
    expert e's rows, and dbias[s, e] = sum_p c_p Y[row_y(p)]; c_p = w_a (SCALE_Y) or 1, act the
    plain activation ACT_X (0: none) applied to X as loaded and rounded back to its dtype (X = z
    gives the h = act(z) that the hidden-gradient kernel would have stored). Row maps as in
    _grouped_matmul_kernel. Buffers out [S, E, KX, NY] and dbias [S, E, NY] are contiguous."""
    pid_es, pid_i, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    expert, split = pid_es // SPLITS, pid_es % SPLITS
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    share = (hi - lo + SPLITS - 1) // SPLITS
    start = lo + split * share
    end = tl.minimum(hi, start + share)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    dbias = tl.zeros((BLOCK_J,), tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        row_mask = p < end
        a = tl.load(order_ptr + p, mask=row_mask, other=0)
        rows_x = a // TOPK if GATHER_X else p.to(tl.int64)
        rows_y = a // TOPK if GATHER_Y else p.to(tl.int64)
        x_t = tl.load(x_ptr + rows_x[None, :] * stride_xm + i[:, None] * stride_xk,
                      mask=row_mask[None, :] & (i[:, None] < KX), other=0.0)
        if ACT_X != 0:  # masked entries stay 0: every plain activation maps 0 to 0
            x_t = _activation(x_t.to(tl.float32), ACT_X, ALPHA_X).to(x_ptr.dtype.element_ty)
        y = _load_rows(y_ptr, rows_y, row_mask, j, NY, stride_ym, stride_yn)
        if SCALE_Y:
            y = (tl.load(weights_ptr + a, mask=row_mask, other=0.0)[:, None] * y.to(tl.float32)).to(x_t.dtype)
        acc = tl.dot(x_t, y, acc)
        if HAS_DBIAS:
            dbias += tl.sum(y.to(tl.float32), axis=0)
    part = split.to(tl.int64) * E + expert
    tl.store(out_ptr + (part * KX + i[:, None]) * NY + j[None, :], acc.to(out_ptr.dtype.element_ty), mask=(i[:, None] < KX) & (j[None, :] < NY))
    if HAS_DBIAS:
        if pid_i == 0:
            tl.store(dbias_ptr + part * NY + j, dbias.to(dbias_ptr.dtype.element_ty), mask=j < NY)


def _swiglu_default_only(configs: list, named_args: dict, **kwargs) -> list:
    """sm_90+ grouped matmul: the default only for swiglu (and the other gated activations), whose
    gate and up tiles double the live accumulators: every candidate spills or overflows shared
    memory there (docs/kernels.md, compile figures)."""
    return configs[:1] if kwargs["ACT"] >= GATED_BASE else configs


# Below sm_90 (mma.sync) only the defaults: the larger candidates spill there
# (docs/kernels.md, compile figures).
_grouped_matmul = arch_autotune(
    _grouped_matmul_kernel, "moe_grouped_matmul", key=["N", "K", "E", "ACT", "STORE_Z"],
    wide=({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
          [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
           {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
           {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}]),
    narrow=({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}, []),
    wide_prune=_swiglu_default_only)
# Widths or row strides off a multiple of 16 (``_tuning.aligned``) load element by element: 8 warps
# (and half the K step below sm_90), as 4 warps spill (docs/kernels.md, compile figures).
def _unaligned_matmul_tuner(narrow_block_m: int):
    return arch_autotune(
        _grouped_matmul_kernel, "moe_grouped_matmul", key=["N", "K", "E", "ACT", "STORE_Z"],
        wide=({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}, []),
        narrow=({"BLOCK_M": narrow_block_m, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3}, []))


_grouped_matmul_unaligned = _unaligned_matmul_tuner(narrow_block_m=64)
# A gated activation in float32 on those tiles below sm_90 (and a clamped or softcapped one, which
# takes them in float32): 32 rows, as its gate and up tiles are two [BLOCK_M, BLOCK_N] float32
# accumulators: 64 x 64 held 255 registers on sm_80 at D=100/300 and 64 x 32 spilled 16 B on 3.9
# (32 x 64: at most 80 on 3.9 and 95 on 3.6; docs/kernels.md, compile figures).
_grouped_matmul_unaligned_gated_f32 = _unaligned_matmul_tuner(narrow_block_m=32)
# Its column-block count sizes the partial dL/dw buffer, so BLOCK_N stays fixed across configs.
_HIDDEN_GRAD_BLOCK_N = 64


def _kept_gated_default_only(configs: list, named_args: dict, **kwargs) -> list:
    """sm_90+ hidden gradient: the default only where it reads a gated activation's kept z
    (``LOAD_Z``, ``recompute_hidden=False``): both candidates spill there, 336-392 B at 255 registers
    (fp16, Triton 3.6, hf-E64/256/384 k=8 swiglu; docs/kernels.md, compile figures)."""
    return configs[:1] if kwargs["LOAD_Z"] and kwargs["ACT"] >= GATED_BASE else configs


# 8 warps at the default on sm_90+. Below sm_90 32-row tiles at 4 warps: 64 rows at 8 warps held
# 229-242 registers (geglu_tanh, S3) or spilled (relu2 in fp32) on Triton 3.6, and 32 rows at 8
# warps, which Triton 3.9 holds to 80-118 registers, spilled there (docs/kernels.md, compile figures).
_grouped_hidden_grad = arch_autotune(
    _grouped_hidden_grad_kernel, "moe_grouped_hidden_grad", key=["D", "H", "DO", "E", "ACT", "LOAD_Z"],
    wide=({"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
          [{"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
           {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}]),
    narrow=({"BLOCK_M": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}, []),
    wide_prune=_kept_gated_default_only)
# Unaligned launches (see ``_grouped_matmul_unaligned``), and gated activations in float32 or clamped,
# where the aligned default spills: 16 warps on sm_90a, 16-row tiles below (docs/kernels.md, compile figures).
_grouped_hidden_grad_unaligned = arch_autotune(
    _grouped_hidden_grad_kernel, "moe_grouped_hidden_grad", key=["D", "H", "DO", "E", "ACT", "LOAD_Z"],
    wide=({"BLOCK_M": 64, "BLOCK_K": 16, "num_warps": 16, "num_stages": 3}, []),
    narrow=({"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3}, []))
def _xty_candidates(configs: list, named_args: dict, **kwargs) -> list:
    """Grouped xty: the default only where a width or row stride is off a multiple of 16
    (``_tuning.aligned``), where both candidates spill; in float32 no configuration holding more
    than 32 operand elements a thread (BLOCK_P (BLOCK_I + BLOCK_J) / threads): the 4-warp
    64 x 128 x 64 candidate (96) spills 12-52 B on sm_80 and sm_90a under Triton 3.6; with an
    activation in X's load (``ACT_X``) the default only: both candidates spilled with GELU's (24-1,144 B,
    S2 bf16/fp16, sm_80 and sm_90a) (docs/kernels.md, compile figures). The default (first) is always kept."""
    widths = (named_args[name] for name in ("KX", "NY", "stride_xm", "stride_xk", "stride_ym", "stride_yn"))
    if not aligned(*widths) or kwargs["ACT_X"]:
        return configs[:1]
    if named_args["x_ptr"].dtype == torch.float32:
        return _at_most_32_operand_elements(configs)
    return configs


def _xty_candidates_narrow(configs: list, named_args: dict, **kwargs) -> list:
    """``_xty_candidates`` below sm_90, where 32 operand elements a thread bound every dtype: the
    4-warp 64 x 128 x 64 candidate spilled 20 B in bf16 and fp16 too (S2, F256; sm_80, Triton 3.6)."""
    return _at_most_32_operand_elements(_xty_candidates(configs, named_args, **kwargs))


def _at_most_32_operand_elements(configs: list) -> list:
    """The default and the candidates holding at most 32 operand elements a thread."""
    return configs[:1] + [c for c in configs[1:] if _operand_elements_per_thread(c) <= 32]


def _operand_elements_per_thread(config) -> int:
    meta = config.kwargs
    return meta["BLOCK_P"] * (meta["BLOCK_I"] + meta["BLOCK_J"]) // (32 * config.num_warps)


_XTY_CANDIDATES = [{"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_P": 32, "num_warps": 8, "num_stages": 3},
                   {"BLOCK_I": 64, "BLOCK_J": 128, "BLOCK_P": 64, "num_warps": 4, "num_stages": 4}]
# Below sm_90 the default at 8 warps: at 4 it spills in fp16 on sm_80 (docs/kernels.md, compile figures).
_grouped_xty = arch_autotune(
    _grouped_xty_kernel, "moe_grouped_xty", key=["KX", "NY", "E", "SPLITS", "ACT_X"],
    wide=({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3}, _XTY_CANDIDATES),
    narrow=({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": 32, "num_warps": 8, "num_stages": 3}, _XTY_CANDIDATES),
    wide_prune=_xty_candidates, narrow_prune=_xty_candidates_narrow)


# Float32 at a width or stride off a multiple of 16: half the row step, as the default's element-wise
# loaded float32 tiles spill (docs/kernels.md, compile figures).
_grouped_xty_unaligned_f32 = arch_autotune(
    _grouped_xty_kernel, "moe_grouped_xty", key=["KX", "NY", "E", "SPLITS", "ACT_X"],
    wide=({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": 16, "num_warps": 4, "num_stages": 3}, []),
    narrow=({"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": 16, "num_warps": 8, "num_stages": 3}, []))


# silu and gelu_tanh: the aligned hidden-gradient default spilled 16 B with them in float32 at F256
# (sm_80, Triton 3.6), and 128 registers on 3.9.
_SIGMOID_PLAIN = (TRITON_CODES["silu"], TRITON_CODES["gelu_tanh"])


def _bounded(act: dict) -> bool:
    """Whether a gated activation clamps or softcaps (more live state in its tiles)."""
    return act["LIMIT"] is not None or act["GATE_SOFTCAP"] is not None or act["UP_SOFTCAP"] is not None


def _matmul_aligned(a: torch.Tensor, b_strides, out_row_stride: int, n: int, k_dim: int, act: dict) -> bool:
    """Whether a grouped matmul launch takes the aligned tiles (``_grouped_matmul``)."""
    # A clamped gated activation in float32 fills the registers at the aligned default on sm_80: it
    # takes the 8-warp tiles too, and so does a softcapped one (assumed alike; docs/kernels.md,
    # compile figures).
    clamped_fp32 = act["ACT"] >= GATED_BASE and _bounded(act) and a.dtype == torch.float32
    return aligned(n, k_dim, a.stride(0), *b_strides, out_row_stride) and not clamped_fp32


def _hidden_grad_aligned(x: torch.Tensor, dy_strides, w: _Weights, act: dict) -> bool:
    """Whether the hidden-gradient launch takes the aligned tiles (``_grouped_hidden_grad``)."""
    # Gated in float32, or clamped (softcapped assumed alike), and the sigmoid-based plain
    # activations in float32: the aligned default spills (docs/kernels.md, compile figures).
    heavy = ((act["ACT"] >= GATED_BASE and (x.dtype == torch.float32 or _bounded(act)))
             or (x.dtype == torch.float32 and act["ACT"] in _SIGMOID_PLAIN))
    return aligned(x.shape[1], w.hidden, w.w2.shape[2], *x.stride(), *dy_strides, *w.w1.stride(),
                   *w.w2.stride()) and not heavy


def keeps_z(x: torch.Tensor, w: _Weights, act: dict) -> bool:
    """Whether the grouped path stores z for backward when asked (``recompute_hidden=False``): for a
    gated activation only where the up-projection and the hidden gradient (dy assumed contiguous)
    take the aligned tiles. The unaligned ones, already near the register limit with a gate and an
    up tile, went over it with the element-wise z stores and loads (U100/U300 swiglu bf16: 255
    registers on Triton 3.9 and 254 on 3.6 in the up-projection on sm_80; 56 B spilled by the hidden
    gradient on sm_90a at U100, 3.9; docs/kernels.md, compile figures); there z is recomputed."""
    if act["ACT"] < GATED_BASE:
        return True
    H = w.hidden
    return (_matmul_aligned(x, w.w1.stride(), H, H, x.shape[1], act)
            and _hidden_grad_aligned(x, (w.w2.shape[2], 1), w, act))


def _h_from_z(z: torch.Tensor, dy: torch.Tensor, d_out: int, act: dict) -> bool:
    """Whether dW2's kernel forms h from the kept z (``ACT_X``) rather than reading a stored h: for
    a plain activation, in bfloat16 or float16, where that launch takes the aligned tiles. The
    activation in the kernel's operand load measured over the register budget elsewhere: 242
    registers at U100/U300 gelu (sm_90a) and 12 B spilled at m2ir-96 (sm_80) on Triton 3.6, 24 B
    spilled in float32 at S2 and F256 gelu (sm_80, Triton 3.9) (docs/kernels.md, compile figures)."""
    return (act["ACT"] < GATED_BASE and z.dtype != torch.float32
            and aligned(z.shape[1], d_out, *z.stride(), *dy.stride()))


def _grouped_matmul_launch(d: _Dispatch, a, b, b_strides, bias: torch.Tensor | None, out, n: int, k_dim: int, *,
                           gather: bool, scatter: bool, act: dict, scale: bool,
                           z_out: torch.Tensor | None = None) -> None:
    """``act``: the activation's constexprs (``ActivationSpec.triton_constexprs`` or ``_NO_ACTIVATION``);
    ``z_out``: a contiguous [A, B's width] buffer for the pre-activation (``STORE_Z``), or None."""
    bias_ptr, stride_be, stride_bn = (b, 0, 0) if bias is None else (bias, bias.stride(0), bias.stride(1))
    gated_f32 = act["ACT"] >= GATED_BASE and a.dtype == torch.float32
    tuned = _grouped_matmul if _matmul_aligned(a, b_strides, out.stride(0), n, k_dim, act) else (
        _grouped_matmul_unaligned_gated_f32 if gated_f32 else _grouped_matmul_unaligned)
    tuned.for_device(a.device)[d.row_grid(lambda meta: triton.cdiv(n, meta["BLOCK_N"]))](
        a, b, bias_ptr, d.weights, d.order, d.offsets, out, out if z_out is None else z_out, n, k_dim,
        d.num_experts, d.top_k,
        a.stride(0), a.stride(1), *b_strides, stride_be, stride_bn, out.stride(0), out.stride(1),
        GATHER_A=gather, SCATTER_OUT=scatter, HAS_BIAS=bias is not None, **act, SCALE_ROWS=scale,
        STORE_Z=z_out is not None, BLOCK_E=d.block_e)


def _grouped_xty_launch(d: _Dispatch, x, y, kx: int, ny: int, *, gather_x: bool, gather_y: bool,
                        scale_y: bool, dtype: torch.dtype, bias_dtype: torch.dtype | None, act: dict = _NO_ACTIVATION):
    """(sum_p act(X)^T (c Y) per expert [E, kx, ny] in ``dtype``, its column sums [E, ny] in
    ``bias_dtype``, or None without one), accumulated in float32; ``act``: a plain activation's
    constexprs, applied to X as loaded (``_NO_ACTIVATION``: X itself)."""
    splits = _row_splits(d.num_assignments, d.num_experts, triton.cdiv(kx, 64) * triton.cdiv(ny, 64), x.device)
    want_dbias = bias_dtype is not None
    out = split_partials(splits, (d.num_experts, kx, ny), dtype, x.device)
    dbias = split_partials(splits, (d.num_experts, ny), bias_dtype, x.device) if want_dbias else out
    grid = lambda meta: (d.num_experts * splits, triton.cdiv(kx, meta["BLOCK_I"]), triton.cdiv(ny, meta["BLOCK_J"]))  # noqa: E731
    unaligned_f32 = x.dtype == torch.float32 and not aligned(kx, ny, *x.stride(), *y.stride())
    tuned = _grouped_xty_unaligned_f32 if unaligned_f32 else _grouped_xty
    tuned.for_device(x.device)[grid](x, y, d.weights, d.order, d.offsets, out, dbias, kx, ny, d.num_experts, d.top_k,
                                     splits, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                     GATHER_X=gather_x, GATHER_Y=gather_y, SCALE_Y=scale_y, HAS_DBIAS=want_dbias,
                                     ACT_X=act["ACT"], ALPHA_X=act["ALPHA"])
    return sum_splits(out, dtype), (sum_splits(dbias, bias_dtype) if want_dbias else None)


def _forward_grouped(d: _Dispatch, x: torch.Tensor, w: _Weights, act: dict, keep_z: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the k weighted expert outputs of each assignment [A, D_out] by assignment id, the
    pre-activation z [A, W1's width] in expert order when ``keep_z`` (which the caller decides by
    ``keeps_z``), else None)."""
    H, DO = w.hidden, w.w2.shape[2]
    hidden = torch.empty(d.num_assignments, H, dtype=x.dtype, device=x.device)
    z = torch.empty(d.num_assignments, w.w1.shape[2], dtype=x.dtype, device=x.device) if keep_z else None
    _grouped_matmul_launch(d, x, w.w1, w.w1.stride(), w.b1, hidden, H, x.shape[1],
                           gather=True, scatter=False, act=act, scale=False, z_out=z)
    out = torch.empty(d.num_assignments, DO, dtype=x.dtype, device=x.device)
    _grouped_matmul_launch(d, hidden, w.w2, w.w2.stride(), w.b2, out, DO, H,
                           gather=False, scatter=True, act=_NO_ACTIVATION, scale=True)
    return out, z


def _backward_grouped(d: _Dispatch, x, dy, w: _Weights, act: dict, need_dx: bool, need_weights: bool,
                      z: torch.Tensor | None = None):
    """(dx by assignment or None, dL/dw by assignment, (dw1, db1, dw2, db2) or Nones); ``z``: the
    forward's pre-activation (``_forward_grouped(keep_z=True)``), read instead of recomputed, but for
    a gated activation whose launch takes the unaligned tiles (a strided dy; see ``keeps_z``).

    The hidden layer h that dW2 = h^T (w g) reads is stored by the hidden-gradient kernel, except
    where no weight gradient is asked for and where z is kept for a plain activation in 16 bits
    at aligned widths (``_h_from_z``): then dW2's kernel forms h = act(z) from z as it loads it
    (as wide as h), and h is never written."""
    D, H, DO, E, A = x.shape[1], w.hidden, w.w2.shape[2], d.num_experts, d.num_assignments
    b1, stride_b1e, stride_b1h = w.b1_args()
    b2, stride_b2e, stride_b2d = w.b2_args()
    column_blocks = triton.cdiv(H, _HIDDEN_GRAD_BLOCK_N)
    dz = torch.empty(A, w.w1.shape[2], dtype=x.dtype, device=x.device)
    dweights = torch.empty(column_blocks, A, dtype=torch.float32, device=x.device)
    aligned_launch = _hidden_grad_aligned(x, dy.stride(), w, act)
    tuned = _grouped_hidden_grad if aligned_launch else _grouped_hidden_grad_unaligned
    if not aligned_launch and act["ACT"] >= GATED_BASE:
        z = None
    h_from_z = z is not None and _h_from_z(z, dy, DO, act)
    hidden = torch.empty(A, H, dtype=x.dtype, device=x.device) if need_weights and not h_from_z else None
    tuned.for_device(x.device)[d.row_grid(lambda meta: column_blocks)](
        x, dy, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, dz if z is None else z,
        dz if hidden is None else hidden, dz, dweights,
        D, H, DO, E, d.top_k, A, *x.stride(), *dy.stride(), *w.w1.stride(), stride_b1e, stride_b1h,
        *w.w2.stride(), stride_b2e, stride_b2d,
        HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, **act, LOAD_Z=z is not None, STORE_H=hidden is not None,
        BLOCK_E=d.block_e, BLOCK_N=_HIDDEN_GRAD_BLOCK_N)
    dx = None
    if need_dx:
        dx = torch.empty(A, D, dtype=x.dtype, device=x.device)
        w1_t = (w.w1.stride(0), w.w1.stride(2), w.w1.stride(1))  # B_e = W1_e^T through strides
        _grouped_matmul_launch(d, dz, w.w1, w1_t, None, dx, D, w.w1.shape[2],
                               gather=False, scatter=True, act=_NO_ACTIVATION, scale=False)
    grads = (None,) * 4
    if need_weights:
        dw2, db2 = _grouped_xty_launch(d, z if h_from_z else hidden, dy, H, DO, gather_x=False, gather_y=True,
                                       scale_y=True, dtype=w.w2.dtype, bias_dtype=None if w.b2 is None else w.b2.dtype,
                                       act=act if h_from_z else _NO_ACTIVATION)
        dw1, db1 = _grouped_xty_launch(d, x, dz, D, w.w1.shape[2], gather_x=True, gather_y=False, scale_y=False,
                                       dtype=w.w1.dtype, bias_dtype=None if w.b1 is None else w.b1.dtype)
        grads = (dw1, db1, dw2, db2)
    return dx, dweights.sum(0), grads


"""Triton kernels of the grouped expert MLP and its autograd Function.

Assignment a = t*k + j sends token t to expert e = experts[t, j] with weight w_a. Kernels walk the
assignments in expert order: position p holds a = sorted_assignments[p], and expert e owns the
contiguous segment offsets[e]:offsets[e+1]. Rows of x are gathered inside the GEMMs (row t = a // k);
x is never copied k times nor padded.

Forward:
    z_a = x_t W1_e + b1_e,   h_a = act(z_a),   o_a = h_a W2_e + b2_e,   y_t = sum_j w_a o_a
Backward, with g_t = dL/dy_t:
    G_a   = g_t W2_e^T                      (so that g_t . (h_a W2_e) = h_a . G_a)
    dw_a  = h_a . G_a + g_t . b2_e
    dz_a  = w_a G_a * act'(z_a)             (swiglu: act = silu(gate) * up, two halves of z)
    dW2_e = sum_a h_a^T (w_a g_t),   db2_e = sum_a w_a g_t
    dW1_e = sum_a x_t^T dz_a,        db1_e = sum_a dz_a
    dx_t  = sum_j dz_a W1_e^T
Only the inputs are saved; z and h are recomputed in backward.

Two paths share the tile schedule and the activation code:
* fused, for model widths D, D_out <= 256 (pixel tokens): one program owns BLOCK_M rows of one
  expert and streams the hidden layer through registers in BLOCK_H chunks, so no [T*k, H] tensor
  ever reaches global memory, forward or backward. Weight gradients come from a second kernel that
  splits each expert's rows into S parts and writes float32 partial sums (no atomics).
* grouped, for any width: grouped GEMMs (gather rows in, scatter rows out, fused bias, activation
  and router-weight scaling) with a transient [T*k, H] hidden buffer.
The combine back to token order sums the k rows of each token in a fixed order (no atomics), so
every path is deterministic.

Tile schedule: expert e needs ceil(n_e / BLOCK_M) row tiles; program m finds its expert by a
prefix sum over those counts, computed in-kernel from the offsets, so the launch grid
ceil(T*k / BLOCK_M) + E is known without reading the counts on the host.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import kernel_configs

ACTIVATIONS = {"gelu": 1, "silu": 2, "relu": 3, "swiglu": 4, "gelu_tanh": 5}
# gelu_tanh(z) = 0.5 z (1 + tanh(u / 2)) = z * sigmoid(u),  u = 2 sqrt(2/pi) (z + 0.044715 z^3),
# 2 sqrt(2/pi) = 1.5957691216057308 (written inline: jit code may read only constexpr globals).
FUSED_MAX_WIDTH = 256


# ----------------------------------------------------------------------------- shared device code

@triton.jit
def _expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of row tile ``pid_m``; expert == E means no work."""
    e = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_through = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_through <= pid_m).to(tl.int32), axis=0)
    tiles_before = tl.sum(tl.where(e < expert, tiles, 0), axis=0)
    safe = tl.minimum(expert, E - 1)
    start = tl.load(offsets_ptr + safe) + (pid_m - tiles_before) * BLOCK_M
    end = tl.load(offsets_ptr + safe + 1)
    return expert, start, end


@triton.jit
def _expert_rows(pid_m, order_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, positions p, row mask, assignment ids a) of row tile ``pid_m``; expert == E: no work."""
    expert, start, end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    p = start + tl.arange(0, BLOCK_M)
    row_mask = p < tl.where(expert < E, end, 0)
    return expert, p, row_mask, tl.load(order_ptr + p, mask=row_mask, other=0)


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return z * tl.sigmoid(z)
    elif ACT == 3:
        return tl.maximum(z, 0.0)
    elif ACT == 5:
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 1:  # Phi(z) + z * phi(z)
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:  # s (1 + z (1 - s))
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        return (z > 0.0).to(tl.float32)
    elif ACT == 5:  # s + z s (1 - s) u'
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        return s + z * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _hidden(z, z_up, ACT: tl.constexpr):
    """h = act(z), or silu(z) * z_up for swiglu (z is then the gate half)."""
    if ACT == 4:
        return _activation(z, 2) * z_up
    return _activation(z, ACT)


@triton.jit
def _hidden_grads(z, z_up, dh, ACT: tl.constexpr):
    """(dL/dz, dL/dz_up) from dL/dh; the second is only meaningful for swiglu."""
    if ACT == 4:
        return dh * z_up * _activation_grad(z, 2), dh * _activation(z, 2)
    return dh * _activation_grad(z, ACT), dh


@triton.jit
def _load_rows(ptr, rows, row_mask, cols, col_limit, stride_row, stride_col):
    """A [rows, cols] tile; rows are int64 indices (gathered or contiguous)."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & (cols[None, :] < col_limit), other=0.0)


@triton.jit
def _load_matrix(ptr, r, r_limit, c, c_limit, stride_r, stride_c):
    """A [len(r), len(c)] block of a matrix addressed through strides (so a transpose is free)."""
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c,
                   mask=(r[:, None] < r_limit) & (c[None, :] < c_limit), other=0.0)


# ----------------------------------------------------------------------------- fused path

@triton.jit
def _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
              HAS_B1: tl.constexpr, ACT: tl.constexpr):
    """(z, z_up) of one hidden chunk hh for an x tile whose full width is in registers."""
    z = tl.dot(x, _load_matrix(w1_e, d, D, hh, H, stride_w1d, stride_w1h))
    z_up = z
    if ACT == 4:
        z_up = tl.dot(x, _load_matrix(w1_e, d, D, hh + H, 2 * H, stride_w1d, stride_w1h))
    if HAS_B1:
        z += tl.load(b1_e + hh * stride_b1h, mask=hh < H, other=0.0).to(tl.float32)[None, :]
        if ACT == 4:
            z_up += tl.load(b1_e + (hh + H) * stride_b1h, mask=hh < H, other=0.0).to(tl.float32)[None, :]
    return z, z_up


@triton.jit
def _fused_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr,
                      D, H, DO, E, TOPK,
                      stride_xt, stride_xd, stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                      stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2d, stride_oa, stride_od,
                      HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    expert, p, row_mask, a = _expert_rows(tl.program_id(0), order_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    d, do = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DO)
    x = _load_rows(x_ptr, a // TOPK, row_mask, d, D, stride_xt, stride_xd)
    e64 = expert.to(tl.int64)
    w1_e, b1_e = w1_ptr + e64 * stride_w1e, b1_ptr + e64 * stride_b1e
    w2_e = w2_ptr + e64 * stride_w2e
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        z, z_up = _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, ACT)
        h = _hidden(z, z_up, ACT).to(x.dtype)
        acc = tl.dot(h, _load_matrix(w2_e, hh, H, do, DO, stride_w2h, stride_w2d), acc)
    if HAS_B2:
        acc += tl.load(b2_ptr + e64 * stride_b2e + do * stride_b2d, mask=do < DO, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(weights_ptr + a, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + a[:, None] * stride_oa + do[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (do[None, :] < DO))


@triton.jit
def _fused_bwd_rows_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, weights_ptr, order_ptr, offsets_ptr,
                           dx_ptr, dweights_ptr,
                           D, H, DO, E, TOPK,
                           stride_xt, stride_xd, stride_gt, stride_gd,
                           stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                           stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2d, stride_dxa, stride_dxd,
                           HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per row tile: dx rows (per assignment) and dL/dw_a, streaming the hidden layer."""
    expert, p, row_mask, a = _expert_rows(tl.program_id(0), order_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    d, do = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DO)
    x = _load_rows(x_ptr, a // TOPK, row_mask, d, D, stride_xt, stride_xd)
    dy = _load_rows(dy_ptr, a // TOPK, row_mask, do, DO, stride_gt, stride_gd)
    w = tl.load(weights_ptr + a, mask=row_mask, other=0.0)
    e64 = expert.to(tl.int64)
    w1_e, b1_e = w1_ptr + e64 * stride_w1e, b1_ptr + e64 * stride_b1e
    w2_e = w2_ptr + e64 * stride_w2e
    dx = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dw = tl.zeros((BLOCK_M,), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        z, z_up = _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, ACT)
        g = tl.dot(dy, _load_matrix(w2_e, do, DO, hh, H, stride_w2d, stride_w2h))
        dw += tl.sum(_hidden(z, z_up, ACT) * g, axis=1)
        dz, dz_up = _hidden_grads(z, z_up, w[:, None] * g, ACT)
        dx = tl.dot(dz.to(x.dtype), _load_matrix(w1_e, hh, H, d, D, stride_w1h, stride_w1d), dx)
        if ACT == 4:
            dx = tl.dot(dz_up.to(x.dtype), _load_matrix(w1_e, hh + H, 2 * H, d, D, stride_w1h, stride_w1d), dx)
    if HAS_B2:
        b2 = tl.load(b2_ptr + e64 * stride_b2e + do * stride_b2d, mask=do < DO, other=0.0).to(tl.float32)
        dw += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
    tl.store(dx_ptr + a[:, None] * stride_dxa + d[None, :] * stride_dxd, dx.to(dx_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (d[None, :] < D))
    tl.store(dweights_ptr + a, dw, mask=row_mask)


@triton.jit
def _fused_bwd_weights_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, weights_ptr, order_ptr, offsets_ptr,
                              dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                              D, H, DO, E, TOPK, SPLITS,
                              stride_xt, stride_xd, stride_gt, stride_gd,
                              stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                              stride_w2e, stride_w2h, stride_w2d,
                              HAS_B1: tl.constexpr, ACT: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Float32 partial weight gradients of part ``split`` of expert e's rows, hidden chunk hh.

    Partial buffers: dw1 [S, E, D, W1 columns], db1 [S, E, W1 columns], dw2 [S, E, H, DO],
    db2 [S, E, DO] (contiguous); the host sums over S.
    """
    pid_es, pid_h = tl.program_id(0), tl.program_id(1)
    expert, split = pid_es // SPLITS, pid_es % SPLITS
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    share = (hi - lo + SPLITS - 1) // SPLITS
    start = lo + split * share
    end = tl.minimum(hi, start + share)
    d, do = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DO)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    e64 = expert.to(tl.int64)
    w1_e, b1_e = w1_ptr + e64 * stride_w1e, b1_ptr + e64 * stride_b1e
    w2_e = w2_ptr + e64 * stride_w2e
    w2_t = _load_matrix(w2_e, do, DO, hh, H, stride_w2d, stride_w2h)
    dw1 = tl.zeros((BLOCK_D, BLOCK_H), tl.float32)
    dw1_up = tl.zeros((BLOCK_D, BLOCK_H), tl.float32)
    db1 = tl.zeros((BLOCK_H,), tl.float32)
    db1_up = tl.zeros((BLOCK_H,), tl.float32)
    dw2 = tl.zeros((BLOCK_H, BLOCK_DO), tl.float32)
    db2 = tl.zeros((BLOCK_DO,), tl.float32)
    for p0 in range(start, end, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        row_mask = p < end
        a = tl.load(order_ptr + p, mask=row_mask, other=0)
        x = _load_rows(x_ptr, a // TOPK, row_mask, d, D, stride_xt, stride_xd)
        dy = _load_rows(dy_ptr, a // TOPK, row_mask, do, DO, stride_gt, stride_gd)
        w = tl.load(weights_ptr + a, mask=row_mask, other=0.0)
        z, z_up = _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, ACT)
        g = tl.dot(dy, w2_t)
        dz, dz_up = _hidden_grads(z, z_up, w[:, None] * g, ACT)
        x_t = tl.trans(x)
        dw1 = tl.dot(x_t, dz.to(x.dtype), dw1)
        db1 += tl.sum(dz, axis=0)
        if ACT == 4:
            dw1_up = tl.dot(x_t, dz_up.to(x.dtype), dw1_up)
            db1_up += tl.sum(dz_up, axis=0)
        scaled_dy = w[:, None] * dy.to(tl.float32)
        dw2 = tl.dot(tl.trans(_hidden(z, z_up, ACT).to(x.dtype)), scaled_dy.to(x.dtype), dw2)
        db2 += tl.sum(scaled_dy, axis=0)
    w1_cols = 2 * H if ACT == 4 else H
    part = split.to(tl.int64) * E + expert  # flat index into the [S, E] partials
    hmask = hh < H
    tl.store(dw1_ptr + (part * D + d[:, None]) * w1_cols + hh[None, :], dw1, mask=(d[:, None] < D) & hmask[None, :])
    tl.store(dw2_ptr + (part * H + hh[:, None]) * DO + do[None, :], dw2, mask=hmask[:, None] & (do[None, :] < DO))
    if HAS_B1:
        tl.store(db1_ptr + part * w1_cols + hh, db1, mask=hmask)
    if ACT == 4:
        tl.store(dw1_ptr + (part * D + d[:, None]) * w1_cols + H + hh[None, :], dw1_up,
                 mask=(d[:, None] < D) & hmask[None, :])
        if HAS_B1:
            tl.store(db1_ptr + part * w1_cols + H + hh, db1_up, mask=hmask)
    if pid_h == 0:
        tl.store(db2_ptr + part * DO + do, db2, mask=do < DO)


# ----------------------------------------------------------------------------- grouped path

@triton.jit
def _grouped_matmul_kernel(a_ptr, b_ptr, bias_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr,
                           N, K, E, TOPK,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_biase, stride_biasn,
                           stride_om, stride_on,
                           GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACT: tl.constexpr, SCALE_ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row_out(p)] = scale_p * act(A[row_in(p)] B_e + bias_e) over each expert's rows p.

    row_in(p) = sorted_assignments[p] // k (GATHER_A) or p; row_out(p) = sorted_assignments[p]
    (SCATTER_OUT) or p; scale_p = w_a (SCALE_ROWS) or 1. For swiglu (ACT 4) B holds 2N columns,
    gate then up, and out = silu(gate) * up.
    """
    expert, p, row_mask, a = _expert_rows(tl.program_id(0), order_ptr, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows_in = a // TOPK if GATHER_A else p.to(tl.int64)
    rows_out = a if SCATTER_OUT else p.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_e = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(a_ptr, rows_in, row_mask, kk, K, stride_am, stride_ak)
        acc = tl.dot(x, _load_matrix(b_e, kk, K, n, N, stride_bk, stride_bn), acc)
        if ACT == 4:
            acc_up = tl.dot(x, _load_matrix(b_e, kk, K, n + N, 2 * N, stride_bk, stride_bn), acc_up)
    if HAS_BIAS:
        bias_e = bias_ptr + expert.to(tl.int64) * stride_biase
        acc += tl.load(bias_e + n * stride_biasn, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 4:
            acc_up += tl.load(bias_e + (n + N) * stride_biasn, mask=n < N, other=0.0).to(tl.float32)[None, :]
    out = _hidden(acc, acc_up, ACT)
    if SCALE_ROWS:
        out *= tl.load(weights_ptr + a, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows_out[:, None] * stride_om + n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (n[None, :] < N))


@triton.jit
def _grouped_hidden_grad_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, weights_ptr, order_ptr,
                                offsets_ptr, h_ptr, dz_ptr, dweights_ptr,
                                D, H, DO, E, TOPK, A,
                                stride_xt, stride_xd, stride_gt, stride_gd,
                                stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                                stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2d,
                                HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                                BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """For rows p of one expert and hidden columns n: recompute z = x W1 + b1 and G = g W2^T,
    store h [p, n], dz [p, n (and n + H for swiglu)] in expert order and the partial
    dL/dw_a = sum_n h G (+ g . b2 in column block 0) at dweights[pid_n, a]."""
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
    w1_e, w2_e = w1_ptr + e64 * stride_w1e, w2_ptr + e64 * stride_w2e
    z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    z_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(x_ptr, tokens, row_mask, kk, D, stride_xt, stride_xd)
        z = tl.dot(x, _load_matrix(w1_e, kk, D, n, H, stride_w1d, stride_w1h), z)
        if ACT == 4:
            z_up = tl.dot(x, _load_matrix(w1_e, kk, D, n + H, 2 * H, stride_w1d, stride_w1h), z_up)
    g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    dy_b2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, DO, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        dy = _load_rows(dy_ptr, tokens, row_mask, kk, DO, stride_gt, stride_gd)
        g = tl.dot(dy, _load_matrix(w2_e, kk, DO, n, H, stride_w2d, stride_w2h), g)
        if HAS_B2:
            b2 = tl.load(b2_ptr + e64 * stride_b2e + kk * stride_b2d, mask=kk < DO, other=0.0).to(tl.float32)
            dy_b2 += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
    if HAS_B1:
        b1_e = b1_ptr + e64 * stride_b1e
        z += tl.load(b1_e + n * stride_b1h, mask=n < H, other=0.0).to(tl.float32)[None, :]
        if ACT == 4:
            z_up += tl.load(b1_e + (n + H) * stride_b1h, mask=n < H, other=0.0).to(tl.float32)[None, :]
    h = _hidden(z, z_up, ACT)
    w = tl.load(weights_ptr + a, mask=row_mask, other=0.0)
    dw = tl.sum(h * g, axis=1)
    if pid_n == 0:
        dw += dy_b2
    tl.store(dweights_ptr + pid_n.to(tl.int64) * A + a, dw, mask=row_mask)
    dz, dz_up = _hidden_grads(z, z_up, w[:, None] * g, ACT)
    cols = 2 * H if ACT == 4 else H
    mask = row_mask[:, None] & (n[None, :] < H)
    rows = p.to(tl.int64)[:, None]
    tl.store(h_ptr + rows * H + n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + rows * cols + n[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if ACT == 4:
        tl.store(dz_ptr + rows * cols + H + n[None, :], dz_up.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_xty_kernel(x_ptr, y_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr, dbias_ptr,
                        KX, NY, E, TOPK, SPLITS,
                        stride_xm, stride_xk, stride_ym, stride_yn,
                        GATHER_X: tl.constexpr, GATHER_Y: tl.constexpr, SCALE_Y: tl.constexpr,
                        HAS_DBIAS: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """Float32 partials out[s, e] = sum_p X[row_x(p)]^T (c_p Y[row_y(p)]) over part s of expert
    e's rows, and dbias[s, e] = sum_p c_p Y[row_y(p)]; c_p = w_a (SCALE_Y) or 1. Row maps as in
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
        y = _load_rows(y_ptr, rows_y, row_mask, j, NY, stride_ym, stride_yn)
        if SCALE_Y:
            y = (tl.load(weights_ptr + a, mask=row_mask, other=0.0)[:, None] * y.to(tl.float32)).to(x_t.dtype)
        acc = tl.dot(x_t, y, acc)
        if HAS_DBIAS:
            dbias += tl.sum(y.to(tl.float32), axis=0)
    part = split.to(tl.int64) * E + expert
    tl.store(out_ptr + (part * KX + i[:, None]) * NY + j[None, :], acc, mask=(i[:, None] < KX) & (j[None, :] < NY))
    if HAS_DBIAS:
        if pid_i == 0:
            tl.store(dbias_ptr + part * NY + j, dbias, mask=j < NY)


# ----------------------------------------------------------------------------- launches

_fused_fwd = triton.autotune(
    kernel_configs("moe_fused_fwd", {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3}]),
    key=["D", "H", "DO", "E"])(_fused_fwd_kernel)
_fused_bwd_rows = triton.autotune(
    kernel_configs("moe_fused_bwd_rows", {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}]),
    key=["D", "H", "DO", "E"])(_fused_bwd_rows_kernel)
_fused_bwd_weights = triton.autotune(
    kernel_configs("moe_fused_bwd_weights", {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}]),
    key=["D", "H", "DO", "E", "SPLITS"])(_fused_bwd_weights_kernel)
_grouped_matmul = triton.autotune(
    kernel_configs("moe_grouped_matmul", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
                   [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
                    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}]),
    key=["N", "K", "E", "ACT"])(_grouped_matmul_kernel)
# Its column-block count sizes the partial dL/dw buffer, so BLOCK_N stays fixed across configs.
_HIDDEN_GRAD_BLOCK_N = 64
_grouped_hidden_grad = triton.autotune(
    kernel_configs("moe_grouped_hidden_grad", {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
                   [{"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
                    {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}]),
    key=["D", "H", "DO", "E", "ACT"])(_grouped_hidden_grad_kernel)
_grouped_xty = triton.autotune(
    kernel_configs("moe_grouped_xty", {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": 32, "num_warps": 4, "num_stages": 3},
                   [{"BLOCK_I": 128, "BLOCK_J": 128, "BLOCK_P": 32, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_I": 64, "BLOCK_J": 128, "BLOCK_P": 64, "num_warps": 4, "num_stages": 4}]),
    key=["KX", "NY", "E", "SPLITS"])(_grouped_xty_kernel)


def use_fused_path(d_in: int, d_out: int) -> bool:
    """The fused path for small widths unless MOE_RESTORE_MLP_PATH pins one ("fused" | "grouped")."""
    choice = os.environ.get("MOE_RESTORE_MLP_PATH", "auto")
    if choice not in ("auto", "fused", "grouped"):
        raise ValueError(f"MOE_RESTORE_MLP_PATH must be auto, fused or grouped, got {choice!r}")
    if choice == "auto":
        return max(d_in, d_out) <= FUSED_MAX_WIDTH
    if choice == "fused" and max(d_in, d_out) > FUSED_MAX_WIDTH:
        raise ValueError(f"the fused path needs D, D_out <= {FUSED_MAX_WIDTH}, got {d_in}, {d_out}")
    return choice == "fused"


def _row_splits(num_assignments: int, num_experts: int, blocks_per_expert: int, device: torch.device) -> int:
    """How many parts to split each expert's rows into for the weight-gradient reductions: enough
    programs to fill the GPU, each still reducing a few hundred rows. Two on the CPU, so that the
    interpreter tests exercise the split."""
    if device.type != "cuda":
        return 2
    programs = num_experts * blocks_per_expert
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    return max(1, min(wanted, num_assignments // (num_experts * 256)))


def _combine(by_assignment: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's k rows (assignment order t*k + j) in float32, in a fixed order."""
    width = by_assignment.shape[-1]
    if top_k == 1:
        return by_assignment.view(num_tokens, width).to(dtype)
    return by_assignment.view(num_tokens, top_k, width).sum(dim=1, dtype=torch.float32).to(dtype)


@dataclass(frozen=True)
class _Dispatch:
    """The routing as the kernels read it."""

    weights: torch.Tensor  # [T*k] float32, by assignment id
    order: torch.Tensor  # sorted_assignments [T*k] int64
    offsets: torch.Tensor  # expert_offsets [E+1] int64
    top_k: int
    num_experts: int

    @property
    def num_assignments(self) -> int:
        return self.order.numel()

    @property
    def block_e(self) -> int:
        return max(16, triton.next_power_of_2(self.num_experts))

    def row_grid(self, columns=lambda meta: 1):
        """Launch grid of a row-tiled kernel: an upper bound on the tile count (see module doc)."""
        return lambda meta: (triton.cdiv(self.num_assignments, meta["BLOCK_M"]) + self.num_experts, columns(meta))


@dataclass(frozen=True)
class _Weights:
    """Expert parameters and the strides the kernels take (a missing bias passes a dummy pointer)."""

    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None
    b2: torch.Tensor | None

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]

    def b1_args(self):
        return (self.w1, 0, 0) if self.b1 is None else (self.b1, self.b1.stride(0), self.b1.stride(1))

    def b2_args(self):
        return (self.w2, 0, 0) if self.b2 is None else (self.b2, self.b2.stride(0), self.b2.stride(1))

    def fused_strides(self) -> tuple[int, ...]:
        b1_stride = self.b1_args()[1:]
        return (*self.w1.stride(), *b1_stride, *self.w2.stride())


def _width_blocks(x: torch.Tensor, w: _Weights) -> dict[str, int]:
    return dict(BLOCK_D=max(16, triton.next_power_of_2(x.shape[1])),
                BLOCK_DO=max(16, triton.next_power_of_2(w.w2.shape[2])))


def _grouped_matmul_launch(d: _Dispatch, a, b, b_strides, bias: torch.Tensor | None, out, n: int, k_dim: int, *,
                           gather: bool, scatter: bool, act: int, scale: bool) -> None:
    bias_ptr, stride_be, stride_bn = (b, 0, 0) if bias is None else (bias, bias.stride(0), bias.stride(1))
    _grouped_matmul[d.row_grid(lambda meta: triton.cdiv(n, meta["BLOCK_N"]))](
        a, b, bias_ptr, d.weights, d.order, d.offsets, out, n, k_dim, d.num_experts, d.top_k,
        a.stride(0), a.stride(1), *b_strides, stride_be, stride_bn, out.stride(0), out.stride(1),
        GATHER_A=gather, SCATTER_OUT=scatter, HAS_BIAS=bias is not None, ACT=act, SCALE_ROWS=scale,
        BLOCK_E=d.block_e)


def _grouped_xty_launch(d: _Dispatch, x, y, kx: int, ny: int, *, gather_x: bool, gather_y: bool,
                        scale_y: bool, want_dbias: bool):
    """(sum_p X^T (c Y) per expert [E, kx, ny], its column sums [E, ny] or None), float32."""
    splits = _row_splits(d.num_assignments, d.num_experts, triton.cdiv(kx, 64) * triton.cdiv(ny, 64), x.device)
    out = torch.empty(splits, d.num_experts, kx, ny, dtype=torch.float32, device=x.device)
    dbias = torch.empty(splits, d.num_experts, ny, dtype=torch.float32, device=x.device) if want_dbias else out
    grid = lambda meta: (d.num_experts * splits, triton.cdiv(kx, meta["BLOCK_I"]), triton.cdiv(ny, meta["BLOCK_J"]))  # noqa: E731
    _grouped_xty[grid](x, y, d.weights, d.order, d.offsets, out, dbias, kx, ny, d.num_experts, d.top_k, splits,
                       x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                       GATHER_X=gather_x, GATHER_Y=gather_y, SCALE_Y=scale_y, HAS_DBIAS=want_dbias)
    return out.sum(0), (dbias.sum(0) if want_dbias else None)


def _forward_fused(d: _Dispatch, x: torch.Tensor, w: _Weights, act: int) -> torch.Tensor:
    out = torch.empty(d.num_assignments, w.w2.shape[2], dtype=x.dtype, device=x.device)
    b1, b2 = w.b1_args()[0], w.b2_args()[0]
    _fused_fwd[d.row_grid()](x, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, out,
                             x.shape[1], w.hidden, w.w2.shape[2], d.num_experts, d.top_k,
                             *x.stride(), *w.fused_strides(), *w.b2_args()[1:], *out.stride(),
                             HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, ACT=act,
                             BLOCK_E=d.block_e, **_width_blocks(x, w))
    return out


def _forward_grouped(d: _Dispatch, x: torch.Tensor, w: _Weights, act: int) -> torch.Tensor:
    H, DO = w.hidden, w.w2.shape[2]
    hidden = torch.empty(d.num_assignments, H, dtype=x.dtype, device=x.device)
    _grouped_matmul_launch(d, x, w.w1, w.w1.stride(), w.b1, hidden, H, x.shape[1],
                           gather=True, scatter=False, act=act, scale=False)
    out = torch.empty(d.num_assignments, DO, dtype=x.dtype, device=x.device)
    _grouped_matmul_launch(d, hidden, w.w2, w.w2.stride(), w.b2, out, DO, H,
                           gather=False, scatter=True, act=0, scale=True)
    return out


def _backward_fused(d: _Dispatch, x, dy, w: _Weights, act: int, need_dx: bool, need_weights: bool):
    D, H, DO, E = x.shape[1], w.hidden, w.w2.shape[2], d.num_experts
    b1, b2 = w.b1_args()[0], w.b2_args()[0]
    blocks = _width_blocks(x, w)
    dx = torch.empty(d.num_assignments, D, dtype=x.dtype, device=x.device)
    dweights = torch.empty(d.num_assignments, dtype=torch.float32, device=x.device)
    _fused_bwd_rows[d.row_grid()](x, dy, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, dx, dweights,
                                  D, H, DO, E, d.top_k, *x.stride(), *dy.stride(), *w.fused_strides(),
                                  *w.b2_args()[1:], *dx.stride(),
                                  HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, ACT=act,
                                  BLOCK_E=d.block_e, **blocks)
    grads = (None,) * 4
    if need_weights:
        splits = _row_splits(d.num_assignments, E, triton.cdiv(H, 32), x.device)
        f32 = dict(dtype=torch.float32, device=x.device)
        dw1 = torch.empty(splits, E, D, w.w1.shape[2], **f32)
        db1 = torch.empty(splits, E, w.w1.shape[2], **f32)
        dw2 = torch.empty(splits, E, H, DO, **f32)
        db2 = torch.empty(splits, E, DO, **f32)
        grid = lambda meta: (E * splits, triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
        _fused_bwd_weights[grid](x, dy, w.w1, b1, w.w2, d.weights, d.order, d.offsets, dw1, db1, dw2, db2,
                                 D, H, DO, E, d.top_k, splits, *x.stride(), *dy.stride(), *w.fused_strides(),
                                 HAS_B1=w.b1 is not None, ACT=act, **blocks)
        grads = (dw1.sum(0), db1.sum(0) if w.b1 is not None else None, dw2.sum(0), db2.sum(0))
    return (dx if need_dx else None), dweights, grads


def _backward_grouped(d: _Dispatch, x, dy, w: _Weights, act: int, need_dx: bool, need_weights: bool):
    D, H, DO, E, A = x.shape[1], w.hidden, w.w2.shape[2], d.num_experts, d.num_assignments
    b1, stride_b1e, stride_b1h = w.b1_args()
    b2, stride_b2e, stride_b2d = w.b2_args()
    column_blocks = triton.cdiv(H, _HIDDEN_GRAD_BLOCK_N)
    hidden = torch.empty(A, H, dtype=x.dtype, device=x.device)
    dz = torch.empty(A, w.w1.shape[2], dtype=x.dtype, device=x.device)
    dweights = torch.empty(column_blocks, A, dtype=torch.float32, device=x.device)
    _grouped_hidden_grad[d.row_grid(lambda meta: column_blocks)](
        x, dy, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, hidden, dz, dweights,
        D, H, DO, E, d.top_k, A, *x.stride(), *dy.stride(), *w.w1.stride(), stride_b1e, stride_b1h,
        *w.w2.stride(), stride_b2e, stride_b2d,
        HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, ACT=act, BLOCK_E=d.block_e,
        BLOCK_N=_HIDDEN_GRAD_BLOCK_N)
    dx = None
    if need_dx:
        dx = torch.empty(A, D, dtype=x.dtype, device=x.device)
        w1_t = (w.w1.stride(0), w.w1.stride(2), w.w1.stride(1))  # B_e = W1_e^T through strides
        _grouped_matmul_launch(d, dz, w.w1, w1_t, None, dx, D, w.w1.shape[2],
                               gather=False, scatter=True, act=0, scale=False)
    grads = (None,) * 4
    if need_weights:
        dw2, db2 = _grouped_xty_launch(d, hidden, dy, H, DO, gather_x=False, gather_y=True, scale_y=True,
                                       want_dbias=w.b2 is not None)
        dw1, db1 = _grouped_xty_launch(d, x, dz, D, w.w1.shape[2], gather_x=True, gather_y=False, scale_y=False,
                                       want_dbias=w.b1 is not None)
        grads = (dw1, db1, dw2, db2)
    return dx, dweights.sum(0), grads


@torch.library.custom_op("moe_restore::moe_mlp", mutates_args=())
def moe_mlp_forward(x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], order: torch.Tensor,
                    offsets: torch.Tensor, activation: str, fused: bool) -> torch.Tensor:
    """The Triton path of ``moe_mlp`` (weights [T, k] float32); saves only its inputs for backward."""
    T, k = weights.shape
    d = _Dispatch(weights.reshape(-1).contiguous(), order, offsets, k, w1.shape[0])
    out = (_forward_fused if fused else _forward_grouped)(d, x, _Weights(w1, w2, b1, b2), ACTIVATIONS[activation])
    return _combine(out, T, k, x.dtype)


@moe_mlp_forward.register_fake
def _(x, weights, w1, w2, b1, b2, order, offsets, activation, fused):
    return x.new_empty(x.shape[0], w2.shape[2])


@torch.library.custom_op("moe_restore::moe_mlp_backward", mutates_args=())
def moe_mlp_backward(dy: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], order: torch.Tensor,
                     offsets: torch.Tensor, activation: str, fused: bool, need_dx: bool, need_params: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweights, dw1, dw2, db1, db2); a gradient not asked for (or of a missing bias) is an
    empty tensor."""
    T, k = weights.shape
    d = _Dispatch(weights.reshape(-1).contiguous(), order, offsets, k, w1.shape[0])
    run = _backward_fused if fused else _backward_grouped
    dx, dweights, (dw1, db1, dw2, db2) = run(d, x, dy, _Weights(w1, w2, b1, b2), ACTIVATIONS[activation],
                                             need_dx, need_params)
    dx = _combine(dx, T, k, x.dtype) if dx is not None else x.new_empty(0)

    def cast(grad, like):  # a fresh empty tensor each time: outputs may not alias one another
        return x.new_empty(0) if grad is None or like is None else grad.to(like.dtype)

    return dx, dweights.view(T, k), cast(dw1, w1), cast(dw2, w2), cast(db1, b1), cast(db2, b2)


@moe_mlp_backward.register_fake
def _(dy, x, weights, w1, w2, b1, b2, order, offsets, activation, fused, need_dx, need_params):
    def like(t, needed):
        return t.new_empty(t.shape) if needed and t is not None else x.new_empty(0)

    return (like(x, need_dx), weights.new_empty(weights.shape), like(w1, need_params), like(w2, need_params),
            like(b1, need_params), like(b2, need_params))


def _moe_mlp_setup(ctx, inputs, output):
    x, weights, w1, w2, b1, b2, order, offsets, activation, fused = inputs
    ctx.save_for_backward(x, weights, w1, w2, b1, b2, order, offsets)
    ctx.config = (activation, fused, b1 is not None, b2 is not None)


def _moe_mlp_grad(ctx, dy):
    x, weights, w1, w2, b1, b2, order, offsets = ctx.saved_tensors
    activation, fused, has_b1, has_b2 = ctx.config
    need = ctx.needs_input_grad
    dx, dweights, dw1, dw2, db1, db2 = moe_mlp_backward(
        dy, x, weights, w1, w2, b1, b2, order, offsets, activation, fused, need[0], any(need[2:6]))
    return (dx if need[0] else None, dweights, dw1 if need[2] else None, dw2 if need[3] else None,
            db1 if has_b1 and need[4] else None, db2 if has_b2 and need[5] else None, None, None, None, None)


moe_mlp_forward.register_autograd(_moe_mlp_grad, setup_context=_moe_mlp_setup)

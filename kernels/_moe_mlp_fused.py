"""Fused expert-MLP path, for model widths D, D_out <= FUSED_MAX_WIDTH (pixel tokens).

The limit is what the compile check measured to fit: at D=256 the backward's [BLOCK_M, D] dx tile
or [BLOCK_H, D] weight-gradient tile per program spills at the sm_90a defaults (docs/kernels.md,
compile figures); wider inputs take the grouped path.

One program owns BLOCK_M rows of one expert and streams the hidden layer through registers in
BLOCK_H chunks, so no [T*k, H] tensor ever reaches global memory, forward or backward. Weight
gradients come from two more kernels (dW2/db2, and dW1/db1 per W1 half) that split each expert's
rows into S parts and write float32 partial sums (no atomics). The math is in ``_moe_mlp_triton``.
Tile sizes differ by tensor-core generation (``_tuning.arch_autotune``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import arch_autotune, kernel_configs
from .activations import GATED_BASE
from ._reductions import split_partials, sum_splits
from ._moe_mlp_tiles import (_Dispatch, _expert_rows, _hidden, _hidden_grads, _load_matrix, _load_rows,
                             GATED, _row_splits, _w1_columns, _Weights, _width_blocks)

FUSED_MAX_WIDTH = 128

@triton.jit
def _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
              HAS_B1: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(z, z_up) of one hidden chunk hh for an x tile whose full width is in registers."""
    w1_gate, b1_gate, w1_up, b1_up = _up_chunks(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
                                                HAS_B1, ACT >= GATED, INTERLEAVED)
    return _project(x, w1_gate, b1_gate, w1_up, b1_up, HAS_B1, ACT >= GATED)


@triton.jit
def _fused_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, weights_ptr, order_ptr, offsets_ptr, out_ptr,
                      D, H, DO, E, TOPK,
                      stride_xt, stride_xd, stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                      stride_w2e, stride_w2h, stride_w2d, stride_b2e, stride_b2d, stride_oa, stride_od,
                      HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
                      LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr, CLAMP_AFTER: tl.constexpr,
                      GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr,
                      INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_E: tl.constexpr,
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
        z, z_up = _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, ACT,
                            INTERLEAVED)
        h = _hidden(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET, CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP).to(x.dtype)
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
                           LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
                           CLAMP_AFTER: tl.constexpr,
                           GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, BLOCK_E: tl.constexpr,
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
        z, z_up = _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, ACT,
                            INTERLEAVED)
        g = tl.dot(dy, _load_matrix(w2_e, do, DO, hh, H, stride_w2d, stride_w2h))
        dw += tl.sum(_hidden(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET,
                             CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP) * g, axis=1)
        dz, dz_up = _hidden_grads(z, z_up, w[:, None] * g, ACT, LIMIT, ALPHA, UP_OFFSET,
                                  CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
        gate_cols, gate_limit = _w1_columns(hh, H, False, INTERLEAVED)
        dx = tl.dot(dz.to(x.dtype), _load_matrix(w1_e, gate_cols, gate_limit, d, D, stride_w1h, stride_w1d), dx)
        if ACT >= GATED:
            up_cols, up_limit = _w1_columns(hh, H, True, INTERLEAVED)
            dx = tl.dot(dz_up.to(x.dtype), _load_matrix(w1_e, up_cols, up_limit, d, D, stride_w1h, stride_w1d), dx)
    if HAS_B2:
        b2 = tl.load(b2_ptr + e64 * stride_b2e + do * stride_b2d, mask=do < DO, other=0.0).to(tl.float32)
        dw += tl.sum(dy.to(tl.float32) * b2[None, :], axis=1)
    tl.store(dx_ptr + a[:, None] * stride_dxa + d[None, :] * stride_dxd, dx.to(dx_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (d[None, :] < D))
    tl.store(dweights_ptr + a, dw, mask=row_mask)


@triton.jit
def _expert_part(pid, offsets_ptr, SPLITS):
    """(expert, split, first row, end row) of the weight-gradient program ``pid``: expert e's rows
    [lo, hi) cut into SPLITS parts of ceil((hi - lo) / SPLITS)."""
    expert, split = pid // SPLITS, pid % SPLITS
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    share = (hi - lo + SPLITS - 1) // SPLITS
    start = lo + split * share
    return expert, split, start, tl.minimum(hi, start + share)


@triton.jit
def _part_rows(p0, end, order_ptr, x_ptr, dy_ptr, weights_ptr, d, D, do, DO, TOPK,
               stride_xt, stride_xd, stride_gt, stride_gd, BLOCK_M: tl.constexpr):
    """(x, dy, w) of the BLOCK_M sorted positions from p0 (rows at or past ``end`` read as zero)."""
    p = p0 + tl.arange(0, BLOCK_M)
    row_mask = p < end
    a = tl.load(order_ptr + p, mask=row_mask, other=0)
    x = _load_rows(x_ptr, a // TOPK, row_mask, d, D, stride_xt, stride_xd)
    dy = _load_rows(dy_ptr, a // TOPK, row_mask, do, DO, stride_gt, stride_gd)
    return x, dy, tl.load(weights_ptr + a, mask=row_mask, other=0.0)


@triton.jit
def _up_chunk(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1: tl.constexpr,
              UP: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(W1[:, c], b1[c] or zeros) of one expert, c the gate (or only) or the UP columns of hidden units hh."""
    cols, limit = _w1_columns(hh, H, UP, INTERLEAVED)
    w = _load_matrix(w1_e, d, D, cols, limit, stride_w1d, stride_w1h)
    b = tl.zeros(hh.shape, tl.float32)
    if HAS_B1:
        b = tl.load(b1_e + cols * stride_b1h, mask=hh < H, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _up_chunks(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1: tl.constexpr,
               WITH_UP: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The gate (or only) half's chunk of W1 and b1, and with WITH_UP a gated activation's up half's
    (the weight-gradient programs own a fixed hidden chunk, so they load these once)."""
    w1_gate, b1_gate = _up_chunk(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, False,
                                 INTERLEAVED)
    w1_up, b1_up = w1_gate, b1_gate
    if WITH_UP:
        w1_up, b1_up = _up_chunk(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h, HAS_B1, True,
                                 INTERLEAVED)
    return w1_gate, b1_gate, w1_up, b1_up


@triton.jit
def _project(x, w1_gate, b1_gate, w1_up, b1_up, HAS_B1: tl.constexpr, WITH_UP: tl.constexpr):
    """(z, z_up) of an x tile; z_up is z itself without WITH_UP."""
    z = tl.dot(x, w1_gate)
    z_up = z
    if WITH_UP:
        z_up = tl.dot(x, w1_up)
    if HAS_B1:
        z += b1_gate[None, :]
        if WITH_UP:
            z_up += b1_up[None, :]
    return z, z_up


# The weight gradients sum over an expert's rows r, with z = x W1 + b1, h = act(z), w_r the routing
# weight and g = dy W2^T:  dW2 = sum_r (w_r h_r)^T dy_r,  dW1 = sum_r x_r^T dz_r,
# dz_r = act'(z_r) * w_r g_r.  They are two kernels, and for swiglu dW1's gate and up halves are
# two launches: each program then keeps one [BLOCK_H, width] float32 accumulator, which is what
# lets 64-row tiles (wgmma on sm_90) compile without spills (both accumulators in one program spill at
# every 64-row configuration: docs/kernels.md, compile figures). The price is recomputing z: 5 dots
# per row tile instead of 4 (8 instead of 6 for swiglu). Every accumulating dot has the hidden chunk
# as its M dimension, so its rows are BLOCK_H, never the model width.
@triton.jit
def _fused_bwd_w2_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, weights_ptr, order_ptr, offsets_ptr, dw2_ptr, db2_ptr,
                         D, H, DO, E, TOPK, SPLITS,
                         stride_xt, stride_xd, stride_gt, stride_gd,
                         stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                         HAS_B1: tl.constexpr, ACT: tl.constexpr,
                         LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
                         CLAMP_AFTER: tl.constexpr,
                         GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr, INTERLEAVED: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Float32 partial dW2 [S, E, H, DO] and db2 [S, E, DO] of part ``split`` of expert e, hidden chunk hh."""
    expert, split, start, end = _expert_part(tl.program_id(0), offsets_ptr, SPLITS)
    pid_h = tl.program_id(1)
    d, do = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DO)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    e64 = expert.to(tl.int64)
    w1_e, b1_e = w1_ptr + e64 * stride_w1e, b1_ptr + e64 * stride_b1e
    w1_gate, b1_gate, w1_up, b1_up = _up_chunks(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
                                                HAS_B1, ACT >= GATED, INTERLEAVED)
    dw2 = tl.zeros((BLOCK_H, BLOCK_DO), tl.float32)
    db2 = tl.zeros((BLOCK_DO,), tl.float32)
    for p0 in range(start, end, BLOCK_M):
        x, dy, w = _part_rows(p0, end, order_ptr, x_ptr, dy_ptr, weights_ptr, d, D, do, DO, TOPK,
                              stride_xt, stride_xd, stride_gt, stride_gd, BLOCK_M)
        z, z_up = _project(x, w1_gate, b1_gate, w1_up, b1_up, HAS_B1, ACT >= GATED)
        weighted_h = (_hidden(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET,
                              CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP) * w[:, None]).to(x.dtype)
        dw2 = tl.dot(tl.trans(weighted_h), dy, dw2)
        db2 += tl.sum(dy.to(tl.float32) * w[:, None], axis=0)
    part = split.to(tl.int64) * E + expert  # flat index into the [S, E] partials
    tl.store(dw2_ptr + (part * H + hh[:, None]) * DO + do[None, :], dw2.to(dw2_ptr.dtype.element_ty), mask=(hh[:, None] < H) & (do[None, :] < DO))
    if pid_h == 0:
        tl.store(db2_ptr + part * DO + do, db2.to(db2_ptr.dtype.element_ty), mask=do < DO)


@triton.jit
def _fused_bwd_w1_kernel(x_ptr, dy_ptr, w1_ptr, b1_ptr, w2_ptr, weights_ptr, order_ptr, offsets_ptr, dw1_ptr, db1_ptr,
                         D, H, DO, E, TOPK, SPLITS,
                         stride_xt, stride_xd, stride_gt, stride_gd,
                         stride_w1e, stride_w1d, stride_w1h, stride_b1e, stride_b1h,
                         stride_w2e, stride_w2h, stride_w2d,
                         HAS_B1: tl.constexpr, ACT: tl.constexpr, UP: tl.constexpr,
                         LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
                         CLAMP_AFTER: tl.constexpr,
                         GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Float32 partial dW1 [S, E, D, W1 columns] and db1 [S, E, W1 columns] of part ``split`` of expert
    e, hidden chunk hh: the gate (or only) columns of hh, or for a gated activation with UP the up half's."""
    expert, split, start, end = _expert_part(tl.program_id(0), offsets_ptr, SPLITS)
    d, do = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DO)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    e64 = expert.to(tl.int64)
    w1_e, b1_e = w1_ptr + e64 * stride_w1e, b1_ptr + e64 * stride_b1e
    w2_t = _load_matrix(w2_ptr + e64 * stride_w2e, do, DO, hh, H, stride_w2d, stride_w2h)
    # a gated activation's gate gradient needs z_up; its up half's needs only the gate, unless up is
    # clamped (its gradient is zero outside [-LIMIT, LIMIT]) or softcapped (1 - tanh(up / S_u)^2)
    WITH_UP: tl.constexpr = ACT >= GATED and (not UP or LIMIT is not None or UP_SOFTCAP is not None)
    w1_gate, b1_gate, w1_up, b1_up = _up_chunks(w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
                                                HAS_B1, WITH_UP, INTERLEAVED)
    dw1_t = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)  # transposed: the hidden chunk is the dot's M
    db1 = tl.zeros((BLOCK_H,), tl.float32)
    for p0 in range(start, end, BLOCK_M):
        x, dy, w = _part_rows(p0, end, order_ptr, x_ptr, dy_ptr, weights_ptr, d, D, do, DO, TOPK,
                              stride_xt, stride_xd, stride_gt, stride_gd, BLOCK_M)
        z, z_up = _project(x, w1_gate, b1_gate, w1_up, b1_up, HAS_B1, WITH_UP)
        dz, dz_up = _hidden_grads(z, z_up, w[:, None] * tl.dot(dy, w2_t), ACT, LIMIT, ALPHA, UP_OFFSET,
                                  CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
        dcol = dz_up if UP else dz
        dw1_t = tl.dot(tl.trans(dcol.to(x.dtype)), x, dw1_t)
        db1 += tl.sum(dcol, axis=0)
    cols = 2 * H if ACT >= GATED else H
    col, _ = _w1_columns(hh, H, UP, INTERLEAVED)
    part = split.to(tl.int64) * E + expert
    tl.store(dw1_ptr + (part * D + d[None, :]) * cols + col[:, None], dw1_t.to(dw1_ptr.dtype.element_ty), mask=(d[None, :] < D) & (hh[:, None] < H))
    if HAS_B1:
        tl.store(db1_ptr + part * cols + col, db1.to(db1_ptr.dtype.element_ty), mask=hh < H)


def _fitting_candidates(configs: list, named_args: dict, **kwargs) -> list:
    """The backward-rows kernel's configurations the autotuner may try below sm_90: the default
    (first) always, the other candidates only at max(D, D_out) x (2 for swiglu) x (2 for float32)
    <= 64: beyond that the candidate spills on sm_80 (docs/kernels.md, compile figures)."""
    width = max(kwargs["BLOCK_D"], kwargs["BLOCK_DO"])
    load = width * (2 if kwargs["ACT"] >= GATED_BASE else 1) * (
        2 if named_args["x_ptr"].dtype == torch.float32 else 1)
    return configs if load <= 64 else configs[:1]


_fused_fwd = triton.autotune(
    kernel_configs("moe_fused_fwd", {"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3}]),
    key=["D", "H", "DO", "E"])(_fused_fwd_kernel)
# The backward's tiles per tensor-core generation: on sm_90+ 64-row tiles (wgmma needs 64 rows per warp
# group, and the weight kernels' accumulating dots need BLOCK_H >= 64 rows); below, mma.sync takes its
# operands through registers and those tiles spill, so 32-row tiles (docs/kernels.md, compile figures).
def _rows_tuner(narrow_stages: int):
    return arch_autotune(
        _fused_bwd_rows_kernel, "moe_fused_bwd_rows", key=["D", "H", "DO", "E", "ACT"],
        wide=({"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
              [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 1}]),
        narrow=({"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": narrow_stages},
                [{"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}]),
        narrow_prune=_fitting_candidates)


_fused_bwd_rows = _rows_tuner(narrow_stages=2)
# Float32 below sm_90: one stage at the default, as two spill 8-16 B on sm_80 (m2ir-small: D=32,
# H=85, gelu; Triton 3.6 and 3.9; docs/kernels.md, compile figures).
_fused_bwd_rows_f32 = _rows_tuner(narrow_stages=1)
_fused_bwd_w2 = arch_autotune(
    _fused_bwd_w2_kernel, "moe_fused_bwd_w2", key=["D", "H", "DO", "E", "SPLITS", "ACT"],
    wide=({"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 1}, []),
    narrow=({"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}, []))
_fused_bwd_w1 = arch_autotune(
    _fused_bwd_w1_kernel, "moe_fused_bwd_w1", key=["D", "H", "DO", "E", "SPLITS", "ACT", "UP"],
    wide=({"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 4, "num_stages": 1}, []),
    narrow=({"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}, []))
# Float32 on sm_90+: 8 warps, as the 4-warp tile's float32 operands fill the registers (255 on
# Triton 3.6 at D=32; docs/kernels.md, compile figures); still on wgmma.
_fused_bwd_w1_f32 = arch_autotune(
    _fused_bwd_w1_kernel, "moe_fused_bwd_w1", key=["D", "H", "DO", "E", "SPLITS", "ACT", "UP"],
    wide=({"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 1}, []),
    narrow=({"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2}, []))


def _forward_fused(d: _Dispatch, x: torch.Tensor, w: _Weights, act: dict) -> torch.Tensor:
    """``act``: the activation's constexprs (``ActivationSpec.triton_constexprs``)."""
    out = torch.empty(d.num_assignments, w.w2.shape[2], dtype=x.dtype, device=x.device)
    b1, b2 = w.b1_args()[0], w.b2_args()[0]
    _fused_fwd[d.row_grid()](x, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, out,
                             x.shape[1], w.hidden, w.w2.shape[2], d.num_experts, d.top_k,
                             *x.stride(), *w.fused_strides(), *w.b2_args()[1:], *out.stride(),
                             HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, **act,
                             BLOCK_E=d.block_e, **_width_blocks(x, w))
    return out


def _backward_fused(d: _Dispatch, x, dy, w: _Weights, act: dict, need_dx: bool, need_weights: bool):
    D, H, DO, E = x.shape[1], w.hidden, w.w2.shape[2], d.num_experts
    b1, b2 = w.b1_args()[0], w.b2_args()[0]
    blocks = _width_blocks(x, w)
    dx = torch.empty(d.num_assignments, D, dtype=x.dtype, device=x.device)
    dweights = torch.empty(d.num_assignments, dtype=torch.float32, device=x.device)
    rows_tuned = _fused_bwd_rows_f32 if x.dtype == torch.float32 else _fused_bwd_rows
    rows_tuned.for_device(x.device)[d.row_grid()](
        x, dy, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, dx, dweights,
        D, H, DO, E, d.top_k, *x.stride(), *dy.stride(), *w.fused_strides(), *w.b2_args()[1:], *dx.stride(),
        HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, **act, BLOCK_E=d.block_e, **blocks)
    grads = (None,) * 4
    if need_weights:
        splits = _row_splits(d.num_assignments, E, triton.cdiv(H, 64), x.device)
        dw1 = split_partials(splits, (E, D, w.w1.shape[2]), w.w1.dtype, x.device)
        dw2 = split_partials(splits, (E, H, DO), w.w2.dtype, x.device)
        # The dW1 kernel writes db1 only with a bias; the dW2 kernel always writes db2 (a few bytes).
        db1 = dw1 if w.b1 is None else split_partials(splits, (E, w.w1.shape[2]), w.b1.dtype, x.device)
        db2 = split_partials(splits, (E, DO), w.w2.dtype if w.b2 is None else w.b2.dtype, x.device)
        grid = lambda meta: (E * splits, triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
        rows = (d.weights, d.order, d.offsets)
        common = (D, H, DO, E, d.top_k, splits, *x.stride(), *dy.stride(), *w.w1.stride(), *w.b1_args()[1:])
        _fused_bwd_w2.for_device(x.device)[grid](x, dy, w.w1, b1, *rows, dw2, db2, *common,
                                                 HAS_B1=w.b1 is not None, **act, **blocks)
        w1_tuned = _fused_bwd_w1_f32 if x.dtype == torch.float32 else _fused_bwd_w1
        for up in ((False, True) if act["ACT"] >= GATED_BASE else (False,)):
            w1_tuned.for_device(x.device)[grid](x, dy, w.w1, b1, w.w2, *rows, dw1, db1, *common, *w.w2.stride(),
                                                HAS_B1=w.b1 is not None, **act, UP=up, **blocks)
        grads = (sum_splits(dw1, w.w1.dtype), sum_splits(db1, w.b1.dtype) if w.b1 is not None else None,
                 sum_splits(dw2, w.w2.dtype), sum_splits(db2, w.b2.dtype) if w.b2 is not None else None)
    return (dx if need_dx else None), dweights, grads

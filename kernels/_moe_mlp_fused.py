"""Fused expert-MLP path, for model widths D, D_out <= FUSED_MAX_WIDTH (pixel tokens).

The limit is what the compile check (``moe-restore compile-check``, docs/benchmarks.md) measured to
fit: at D=256 the backward holds a [BLOCK_M, D] dx tile and a [D, BLOCK_H] dW1 tile per program
and spills at every configuration tried (backward-weights 296-7124 B on sm_90a at the default,
624-11804 B at the other candidates; in fp32 the backward-rows kernel needs 164-232 KiB of shared
memory, over sm_80's 163 KiB); wider inputs take the grouped path.

One program owns BLOCK_M rows of one expert and streams the hidden layer through registers in
BLOCK_H chunks, so no [T*k, H] tensor ever reaches global memory, forward or backward. Weight
gradients come from a second kernel that splits each expert's rows into S parts and writes float32
partial sums (no atomics). The math is in ``_moe_mlp_triton``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import kernel_configs
from .activations import TRITON_CODES
from ._moe_mlp_tiles import (_Dispatch, _expert_rows, _hidden, _hidden_grads, _load_matrix, _load_rows,
                             SWIGLU, _row_splits, _Weights, _width_blocks)

FUSED_MAX_WIDTH = 128

@triton.jit
def _fused_up(x, w1_e, b1_e, d, D, hh, H, stride_w1d, stride_w1h, stride_b1h,
              HAS_B1: tl.constexpr, ACT: tl.constexpr):
    """(z, z_up) of one hidden chunk hh for an x tile whose full width is in registers."""
    z = tl.dot(x, _load_matrix(w1_e, d, D, hh, H, stride_w1d, stride_w1h))
    z_up = z
    if ACT == SWIGLU:
        z_up = tl.dot(x, _load_matrix(w1_e, d, D, hh + H, 2 * H, stride_w1d, stride_w1h))
    if HAS_B1:
        z += tl.load(b1_e + hh * stride_b1h, mask=hh < H, other=0.0).to(tl.float32)[None, :]
        if ACT == SWIGLU:
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
        if ACT == SWIGLU:
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
        if ACT == SWIGLU:
            dw1_up = tl.dot(x_t, dz_up.to(x.dtype), dw1_up)
            db1_up += tl.sum(dz_up, axis=0)
        scaled_dy = w[:, None] * dy.to(tl.float32)
        dw2 = tl.dot(tl.trans(_hidden(z, z_up, ACT).to(x.dtype)), scaled_dy.to(x.dtype), dw2)
        db2 += tl.sum(scaled_dy, axis=0)
    w1_cols = 2 * H if ACT == SWIGLU else H
    part = split.to(tl.int64) * E + expert  # flat index into the [S, E] partials
    hmask = hh < H
    tl.store(dw1_ptr + (part * D + d[:, None]) * w1_cols + hh[None, :], dw1, mask=(d[:, None] < D) & hmask[None, :])
    tl.store(dw2_ptr + (part * H + hh[:, None]) * DO + do[None, :], dw2, mask=hmask[:, None] & (do[None, :] < DO))
    if HAS_B1:
        tl.store(db1_ptr + part * w1_cols + hh, db1, mask=hmask)
    if ACT == SWIGLU:
        tl.store(dw1_ptr + (part * D + d[:, None]) * w1_cols + H + hh[None, :], dw1_up,
                 mask=(d[:, None] < D) & hmask[None, :])
        if HAS_B1:
            tl.store(db1_ptr + part * w1_cols + H + hh, db1_up, mask=hmask)
    if pid_h == 0:
        tl.store(db2_ptr + part * DO + do, db2, mask=do < DO)


def _fitting_candidates(configs: list, named_args: dict, **kwargs) -> list:
    """The backward kernels' configurations the autotuner may try: the default (first) always, the
    other candidates only at max(D, D_out) x (2 for swiglu) x (2 for float32) <= 64. The compile
    check (``--all-configs``, docs/benchmarks.md) saw every candidate other than the default spill
    beyond that: 12-248 B (rows) and 108-3120 B (weights) at bf16 swiglu D=64, 78-148 B and 512-852 B
    at bf16 D=128, 124 B and 324-784 B at fp32 D=64, on sm_90a or sm_80."""
    width = max(kwargs["BLOCK_D"], kwargs["BLOCK_DO"])
    load = width * (2 if kwargs["ACT"] == TRITON_CODES["swiglu"] else 1) * (
        2 if named_args["x_ptr"].dtype == torch.float32 else 1)
    return configs if load <= 64 else configs[:1]


_fused_fwd = triton.autotune(
    kernel_configs("moe_fused_fwd", {"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3}]),
    key=["D", "H", "DO", "E"])(_fused_fwd_kernel)
_fused_bwd_rows = triton.autotune(
    kernel_configs("moe_fused_bwd_rows", {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_M": 64, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
                    {"BLOCK_M": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}]),
    key=["D", "H", "DO", "E", "ACT"], prune_configs_by={"early_config_prune": _fitting_candidates}
)(_fused_bwd_rows_kernel)
# No BLOCK_M=64, BLOCK_H=64, 8-warp candidate: it spilled at every width (60-1036 B at bf16 D=64).
_fused_bwd_weights = triton.autotune(
    kernel_configs("moe_fused_bwd_weights", {"BLOCK_M": 32, "BLOCK_H": 32, "num_warps": 4, "num_stages": 2},
                   [{"BLOCK_M": 64, "BLOCK_H": 32, "num_warps": 4, "num_stages": 3}]),
    key=["D", "H", "DO", "E", "SPLITS", "ACT"], prune_configs_by={"early_config_prune": _fitting_candidates}
)(_fused_bwd_weights_kernel)

def _forward_fused(d: _Dispatch, x: torch.Tensor, w: _Weights, act: int) -> torch.Tensor:
    out = torch.empty(d.num_assignments, w.w2.shape[2], dtype=x.dtype, device=x.device)
    b1, b2 = w.b1_args()[0], w.b2_args()[0]
    _fused_fwd[d.row_grid()](x, w.w1, b1, w.w2, b2, d.weights, d.order, d.offsets, out,
                             x.shape[1], w.hidden, w.w2.shape[2], d.num_experts, d.top_k,
                             *x.stride(), *w.fused_strides(), *w.b2_args()[1:], *out.stride(),
                             HAS_B1=w.b1 is not None, HAS_B2=w.b2 is not None, ACT=act,
                             BLOCK_E=d.block_e, **_width_blocks(x, w))
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


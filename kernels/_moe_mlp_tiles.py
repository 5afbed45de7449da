"""Device code and launch structures shared by the fused and grouped expert-MLP paths.

Tile schedule: expert e needs ceil(n_e / BLOCK_M) row tiles; program m finds its expert by a
prefix sum over those counts, computed in-kernel from the offsets, so the launch grid
ceil(T*k / BLOCK_M) + E is known without reading the counts on the host.

Activations reach the kernels as constexprs: ``ACT`` (the kind's code in ``activations.TRITON_CODES``) and
the gated kinds' parameters (``ActivationSpec.triton_constexprs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import settings
from .activations import GATED_BASE, TRITON_CODES

# The activation codes as constexprs the jit code can read (globals must be constexpr there).
GELU = tl.constexpr(TRITON_CODES["gelu"])
SILU = tl.constexpr(TRITON_CODES["silu"])
RELU = tl.constexpr(TRITON_CODES["relu"])
RELU2 = tl.constexpr(TRITON_CODES["relu2"])
GELU_TANH = tl.constexpr(TRITON_CODES["gelu_tanh"])
GATED = tl.constexpr(GATED_BASE)  # ACT >= GATED: gate and up halves, gate function ACT - GATED

# gelu_tanh(z) = 0.5 z (1 + tanh(u / 2)) = z * sigmoid(u),  u = 2 sqrt(2/pi) (z + 0.044715 z^3),
# 2 sqrt(2/pi) = 1.5957691216057308 (written inline: jit code may read only constexpr globals).


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
def _activation(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    if ACT == GELU:  # exact GELU: z * Phi(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == SILU:  # z * sigmoid(alpha z); alpha = 1 but for a swiglu gate with its own slope
        return z * tl.sigmoid(ALPHA * z)
    elif ACT == RELU:  # a relu that keeps NaN, as torch's does (tl.maximum drops it)
        return tl.where(z < 0.0, 0.0, z)
    elif ACT == RELU2:  # relu(z)^2, NaN kept as above
        return tl.where(z < 0.0, 0.0, z * z)
    elif ACT == GELU_TANH:
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    if ACT == GELU:  # Phi(z) + z * phi(z)
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == SILU:  # s (1 + alpha z (1 - s)),  s = sigmoid(alpha z)
        s = tl.sigmoid(ALPHA * z)
        return s * (1.0 + ALPHA * z * (1.0 - s))
    elif ACT == RELU:
        return (z > 0.0).to(tl.float32)
    elif ACT == RELU2:  # 2 max(z, 0)
        return tl.where(z > 0.0, 2.0 * z, 0.0)
    elif ACT == GELU_TANH:  # s + z s (1 - s) u'
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        return s + z * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _tanh(u):
    """tanh(u) = 2 sigmoid(2u) - 1 (tl.math has no tanh)."""
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gate_up(z, z_up, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
             CLAMP_AFTER: tl.constexpr, GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr):
    """(gate after its input clamp, f of it, f after its output clamp, up factor s_u(clamp(up, -L,
    L)) + UP_OFFSET) of a gated activation (``activations`` module docstring); the clamps keep NaN,
    as torch.clamp does. With GATE_SOFTCAP, f(g) = S_g tanh(g / S_g) sigmoid(ALPHA g)."""
    gate = z
    if LIMIT is not None:
        if not CLAMP_AFTER:
            gate = tl.where(z > LIMIT, LIMIT, z)
    if GATE_SOFTCAP is not None:
        f = GATE_SOFTCAP * _tanh(gate / GATE_SOFTCAP) * tl.sigmoid(ALPHA * gate)
    else:
        f = _activation(gate, ACT - GATED, ALPHA)
    f_out = f
    up = z_up
    if LIMIT is not None:
        if CLAMP_AFTER:
            f_out = tl.where(f > LIMIT, LIMIT, f)
        up = tl.where(z_up > LIMIT, LIMIT, tl.where(z_up < -LIMIT, -LIMIT, z_up))
    if UP_SOFTCAP is not None:
        up = UP_SOFTCAP * _tanh(up / UP_SOFTCAP)
    return gate, f, f_out, up + UP_OFFSET


@triton.jit
def _hidden(z, z_up, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr,
            CLAMP_AFTER: tl.constexpr, GATE_SOFTCAP: tl.constexpr, UP_SOFTCAP: tl.constexpr):
    """h = act(z), or for a gated ACT f(gate) * (up + UP_OFFSET) with its clamps and softcaps (z is
    then the gate half)."""
    if ACT >= GATED:
        gate, f, f_out, up = _gate_up(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET, CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
        return f_out * up
    return _activation(z, ACT, ALPHA)


@triton.jit
def _hidden_grads(z, z_up, dh, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr,
                  UP_OFFSET: tl.constexpr, CLAMP_AFTER: tl.constexpr, GATE_SOFTCAP: tl.constexpr,
                  UP_SOFTCAP: tl.constexpr):
    """(dL/dz, dL/dz_up) from dL/dh; the second is only meaningful for a gated ACT, where a clamped
    value passes no gradient outside its range (at the bound it does, as torch.clamp's), and a
    softcapped one S tanh(x / S) has the derivative 1 - tanh(x / S)^2."""
    if ACT >= GATED:
        gate, f, f_out, up = _gate_up(z, z_up, ACT, LIMIT, ALPHA, UP_OFFSET, CLAMP_AFTER, GATE_SOFTCAP, UP_SOFTCAP)
        dh_gate = dh
        dh_up = dh
        if LIMIT is not None:  # the cuts first, so that z and z_up need not stay live
            dh_up = tl.where((z_up >= -LIMIT) & (z_up <= LIMIT), dh, 0.0)
            if CLAMP_AFTER:
                dh_gate = tl.where(f <= LIMIT, dh, 0.0)
            else:
                dh_gate = tl.where(z <= LIMIT, dh, 0.0)
        if UP_SOFTCAP is not None:
            t_up = _tanh(z_up / UP_SOFTCAP)
            dh_up = dh_up * (1.0 - t_up * t_up)
        if GATE_SOFTCAP is not None:  # f' = (1 - t^2) s + S_g t ALPHA s (1 - s), t = tanh(g / S_g), s = sigmoid(ALPHA g)
            t = _tanh(gate / GATE_SOFTCAP)
            s = tl.sigmoid(ALPHA * gate)
            f_grad = (1.0 - t * t) * s + GATE_SOFTCAP * t * ALPHA * s * (1.0 - s)
        else:
            f_grad = _activation_grad(gate, ACT - GATED, ALPHA)
        return dh_gate * up * f_grad, dh_up * f_out
    return dh * _activation_grad(z, ACT, ALPHA), dh


@triton.jit
def _w1_columns(j, H, UP: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(columns, column limit) of W1 (and b1, dz) holding the gate (UP False) or the up half of
    hidden units j: j and H + j concatenated, 2j and 2j + 1 interleaved; column < limit iff j < H."""
    if INTERLEAVED:
        if UP:
            return 2 * j + 1, 2 * H + 1
        else:
            return 2 * j, 2 * H
    else:
        if UP:
            return j + H, 2 * H
        else:
            return j, H


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



def _row_splits(num_assignments: int, num_experts: int, blocks_per_expert: int, device: torch.device) -> int:
    """How many parts to split each expert's rows into for the weight-gradient reductions: enough
    programs to fill the GPU, each still reducing a few hundred rows; one part off CUDA, where
    there are no SMs to fill. ``MOE_RESTORE_ROW_SPLITS`` pins the count (see ``settings``)."""
    if device.type != "cuda":
        return settings.row_splits(1)
    programs = num_experts * blocks_per_expert
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    return settings.row_splits(max(1, min(wanted, num_assignments // (num_experts * 256))))


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


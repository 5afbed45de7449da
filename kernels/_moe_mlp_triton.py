"""The Triton path of the grouped expert MLP: the custom ops and their autograd registration.

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
By default only the inputs are saved and z and h are recomputed in backward (on the grouped path
the hidden-gradient kernel repeats the up-projection's GEMM x W1). With ``keep_z`` (``moe_mlp``'s
``recompute_hidden=False``) the grouped path's up-projection also writes z [T*k, W1's width] in the
input dtype, in expert order, which autograd keeps and the backward reads instead: one GEMM fewer
(S2: 14% of the step's FLOPs) for k * W1's width values per token kept, the trade SonicMoE makes.
With a plain activation z is also all dW2 needs: its kernel forms h = act(z) as it loads z, and the
hidden-gradient kernel writes no h (one [T*k, H] write fewer).
The fused path ignores ``keep_z``: its hidden layer never reaches global memory, and storing z there
would add the [T*k, H] write that path exists to avoid; so does the grouped path for a gated
activation on its unaligned tiles (``_moe_mlp_grouped.keeps_z``).

Two paths share the tile schedule and the activation code (``_moe_mlp_tiles``): fused
(``_moe_mlp_fused``, D, D_out <= FUSED_MAX_WIDTH = 128, the hidden layer never reaches global
memory) and grouped (``_moe_mlp_grouped``, any width, grouped GEMMs with a transient [T*k, H]
hidden buffer). The fused limit is where its kernels fit a GPU: at D=256 the compile check
(docs/benchmarks.md) measured spills in the fused backward at every configuration and, in fp32,
more shared memory than an sm_80 block has, so wider inputs take the grouped path; below it the
automatic choice (``use_fused_path``) also sends swiglu and float32 inputs to the grouped path
where the fused backward was measured to spill.
The combine back to token order (``_reductions``) sums the k rows of each token in a fixed
order in one pass (no atomics, no float32 buffer), so every path is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import settings
from ._backend import refuse_double_backward
from ._reductions import combine
from ._moe_mlp_fused import FUSED_MAX_WIDTH, _backward_fused, _forward_fused
from ._moe_mlp_grouped import _backward_grouped, _forward_grouped, keeps_z
from ._moe_mlp_tiles import _Dispatch, _Weights
from .activations import Activation, activation_spec, triton_constexprs


# Widest max(D, D_out) by (gated, float32) at which the fused kernels' defaults fit within 240 of 255
# registers on Triton 3.6 and 3.9; the sm_90a dW1 kernel sets it (docs/kernels.md, compile figures).
_FUSED_FIT = {(False, False): 64, (True, False): 0, (False, True): 32, (True, True): 0}
# The fused kernels hold the whole padded width per program; widths off a multiple of 16 (loaded element
# by element) spill at every activation and take the grouped path (docs/kernels.md, compile figures).
_FUSED_WIDTHS = (16, 32, 48, 64)


def use_fused_path(d_in: int, d_out: int, activation: Activation = "gelu", dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the expert MLP takes the fused path: MOE_RESTORE_MLP_PATH pins one ("fused" |
    "grouped"; "fused" needs D, D_out <= FUSED_MAX_WIDTH, else ValueError); "auto" (the default)
    takes it where it fits without spilling, within a register margin, on Triton 3.6 and 3.9: D and
    D_out among 16, 32, 48 and 64 in bfloat16 and float16, 16 and 32 in float32, never for a gated
    activation (swiglu, geglu, geglu_tanh, with or without parameters)."""
    choice = settings.mlp_path()
    width = max(d_in, d_out)
    if choice == "auto":
        return (d_in in _FUSED_WIDTHS and d_out in _FUSED_WIDTHS
                and width <= _FUSED_FIT[activation_spec(activation).gated, dtype == torch.float32])
    if choice == "fused" and width > FUSED_MAX_WIDTH:
        raise ValueError(f"the fused path needs D, D_out <= {FUSED_MAX_WIDTH}, got {d_in}, {d_out}")
    return choice == "fused"


def _keeps_z(x: torch.Tensor, w: _Weights, activation: str, fused: bool, keep_z: bool) -> bool:
    """Whether the forward stores the pre-activation for backward: asked for, on the grouped path,
    where its launches allow (``_moe_mlp_grouped.keeps_z``)."""
    return keep_z and not fused and keeps_z(x, w, triton_constexprs(activation))


@torch.library.custom_op("moe_restore::moe_mlp", mutates_args=())
def moe_mlp_forward(x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], order: torch.Tensor,
                    offsets: torch.Tensor, activation: str, fused: bool, keep_z: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``moe_mlp`` (weights [T, k] float32): (y, z), z the pre-activation [T*k,
    W1's width] in expert order where ``_keeps_z``, else an empty tensor. Autograd saves the inputs
    and that z (see the module docstring)."""
    T, k = weights.shape
    d = _Dispatch(weights.reshape(-1).contiguous(), order, offsets, k, w1.shape[0])
    w, act = _Weights(w1, w2, b1, b2), triton_constexprs(activation)
    kept = _keeps_z(x, w, activation, fused, keep_z)
    out, z = (_forward_fused(d, x, w, act), None) if fused else _forward_grouped(d, x, w, act, kept)
    return combine(out, T, k, x.dtype), x.new_empty(0) if z is None else z


@moe_mlp_forward.register_fake
def _(x, weights, w1, w2, b1, b2, order, offsets, activation, fused, keep_z):
    kept = _keeps_z(x, _Weights(w1, w2, b1, b2), activation, fused, keep_z)
    z = x.new_empty(weights.numel(), w1.shape[2]) if kept else x.new_empty(0)
    return x.new_empty(x.shape[0], w2.shape[2]), z


@torch.library.custom_op("moe_restore::moe_mlp_backward", mutates_args=())
def moe_mlp_backward(dy: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], order: torch.Tensor,
                     offsets: torch.Tensor, z: Optional[torch.Tensor], activation: str, fused: bool, need_dx: bool,
                     need_params: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweights, dw1, dw2, db1, db2); a gradient not asked for (or of a missing bias) is an
    empty tensor. ``z``: the forward's stored pre-activation (grouped path), or None to recompute it."""
    T, k = weights.shape
    d = _Dispatch(weights.reshape(-1).contiguous(), order, offsets, k, w1.shape[0])
    w, act = _Weights(w1, w2, b1, b2), triton_constexprs(activation)
    if fused:
        dx, dweights, (dw1, db1, dw2, db2) = _backward_fused(d, x, dy, w, act, need_dx, need_params)
    else:
        dx, dweights, (dw1, db1, dw2, db2) = _backward_grouped(d, x, dy, w, act, need_dx, need_params, z)
    dx = combine(dx, T, k, x.dtype) if dx is not None else x.new_empty(0)

    def or_empty(grad):  # a fresh empty tensor each time: outputs may not alias one another
        return x.new_empty(0) if grad is None else grad

    return dx, dweights.view(T, k), or_empty(dw1), or_empty(dw2), or_empty(db1), or_empty(db2)


@moe_mlp_backward.register_fake
def _(dy, x, weights, w1, w2, b1, b2, order, offsets, z, activation, fused, need_dx, need_params):
    def like(t, needed):
        return t.new_empty(t.shape) if needed and t is not None else x.new_empty(0)

    return (like(x, need_dx), weights.new_empty(weights.shape), like(w1, need_params), like(w2, need_params),
            like(b1, need_params), like(b2, need_params))


def _moe_mlp_setup(ctx, inputs, output):
    x, weights, w1, w2, b1, b2, order, offsets, activation, fused, keep_z = inputs
    z = output[1]
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)  # else autograd writes a zero [T*k, W1's width] "gradient" of z
    # The op and its fake return an empty z where they keep none (``_keeps_z``), as None to the backward.
    ctx.save_for_backward(x, weights, w1, w2, b1, b2, order, offsets, z if z.numel() else None)
    ctx.config = (activation, fused, b1 is not None, b2 is not None)


def _moe_mlp_grad(ctx, dy, _dz):  # z is not differentiable: _dz is None
    x, weights, w1, w2, b1, b2, order, offsets, z = ctx.saved_tensors
    activation, fused, has_b1, has_b2 = ctx.config
    need = ctx.needs_input_grad
    dx, dweights, dw1, dw2, db1, db2 = moe_mlp_backward(
        dy, x, weights, w1, w2, b1, b2, order, offsets, z, activation, fused, need[0], any(need[2:6]))
    return (dx if need[0] else None, dweights, dw1 if need[2] else None, dw2 if need[3] else None,
            db1 if has_b1 and need[4] else None, db2 if has_b2 and need[5] else None, None, None, None, None, None)


moe_mlp_forward.register_autograd(_moe_mlp_grad, setup_context=_moe_mlp_setup)
moe_mlp_backward.register_autograd(refuse_double_backward("moe_mlp", "neither backend supports it"))


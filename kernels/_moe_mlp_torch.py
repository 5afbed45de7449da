"""The "torch" backend of ``moe_mlp``: two grouped GEMM ops over the assignments sorted by expert
(biases fused into addmm), everything else once over all of them with static shapes, and a
hand-written backward.

With the N = T*k assignments sorted by expert (token t_a, weight w_a, expert e_a):

    u = x[t],  z = u @ w1[e] + b1[e],  h = act(z),  o = h @ w2[e] + b2[e],  y[t_a] += w_a * o_a

Kept for backward: the inputs (x, the routing weights and order, the parameters) and z, which
costs k * H(or 2H) values per token against the eager loop's u, z, h and o; u and h are
recomputed from x and z there. With g = dy[t] and q = g @ w2[e]^T:

    dw_a = q_a . h_a + g_a . b2[e_a]       (dy . o without recomputing o)
    dW2[e] = h^T (w g),  db2[e] = sum_a w_a g_a,  dh = w q
    dz = act'(z) dh,  dW1[e] = u^T dz,  db1[e] = sum_a dz_a,  dx[t_a] += dz_a @ w1[e]^T

The grouped GEMMs are two custom ops, ``grouped_linear`` ([N, in] rows by expert segment times
w[e]) and ``grouped_weight_grad`` (per expert a[seg]^T g[seg]). Each reads the E+1 expert offsets
inside itself and multiplies slice by slice, as ``torch._grouped_mm``'s CPU kernel and
transformers' ``grouped_mm`` fallback do; their outputs have static shapes, so torch.compile
traces the whole op with fullgraph=True, dynamic shapes included, and no data-dependent size
reaches the graph. ``torch._grouped_mm`` itself is not used: on torch 2.13's CPU it refuses
float64 (the oracle dtype), needs every stride to be a multiple of 16 bytes, fails in backward on
a stride-0 gradient, and measured no faster than the slice loop (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .activations import activate, activation_backward
from .routing import Routing


def _slices(offsets: torch.Tensor):
    """(e, lo, hi) of every expert with assignments; the op's one read of the offsets."""
    bounds = offsets.tolist()
    return ((e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo)


@torch.library.custom_op("moe_restore::grouped_linear", mutates_args=())
def grouped_linear(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], offsets: torch.Tensor
                   ) -> torch.Tensor:
    """[N, out]: a[lo:hi] @ w[e] + b[e] for every expert's rows lo:hi = offsets[e]:offsets[e+1]
    (``offsets`` [E+1] int64 from 0 to N, checked by ``moe_mlp``)."""
    out = a.new_empty(a.shape[0], w.shape[2])
    for e, lo, hi in _slices(offsets):
        if b is None:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
        else:
            torch.addmm(b[e], a[lo:hi], w[e], out=out[lo:hi])
    return out


@grouped_linear.register_fake
def _(a, w, b, offsets):
    return a.new_empty(a.shape[0], w.shape[2])


@torch.library.custom_op("moe_restore::grouped_weight_grad", mutates_args=())
def grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, in, out]: a[lo:hi]^T @ g[lo:hi] per expert (zeros for an expert without rows)."""
    out = a.new_zeros(offsets.shape[0] - 1, a.shape[1], g.shape[1])
    for e, lo, hi in _slices(offsets):
        torch.mm(a[lo:hi].T, g[lo:hi], out=out[e])
    return out


@grouped_weight_grad.register_fake
def _(a, g, offsets):
    return a.new_empty(offsets.shape[0] - 1, a.shape[1], g.shape[1])


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, b1, b2, order, offsets, row_experts, activation):
        T, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):  # moe_mlp already cast to the autocast dtype
            tokens = order // k
            z = grouped_linear(x.index_select(0, tokens), w1, b1, offsets)
            h = activate(z, activation)
            o = grouped_linear(h, w2, b2, offsets)
            # The combine accumulates in at least float32 (the routing weights' dtype).
            y = torch.zeros(T, w2.shape[2], dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
            y = y.index_add(0, tokens, o * weights.reshape(-1)[order, None])
        ctx.save_for_backward(x, weights, w1, w2, b1, b2, order, offsets, row_experts, z)
        ctx.activation = activation
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weights, w1, w2, b1, b2, order, offsets, row_experts, z = ctx.saved_tensors
        T, k = weights.shape
        E = w1.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            tokens = order // k
            scale = weights.reshape(-1)[order, None].to(x.dtype)
            u, g = x.index_select(0, tokens), dy.to(x.dtype).index_select(0, tokens)
            h = activate(z, ctx.activation)
            q = grouped_linear(g, w2.transpose(1, 2), None, offsets)
            dw = (q * h).sum(dim=-1, dtype=weights.dtype)
            if b2 is not None:  # g_a . b2[e_a], as one grouped product with a single output column
                dw = dw + grouped_linear(g, b2[:, :, None], None, offsets)[:, 0]
            dweights = torch.zeros_like(dw).index_copy(0, order, dw).view(T, k)
            g = g * scale  # the gradient of o
            dz = activation_backward(q * scale, z, ctx.activation)
            dw1, dw2 = grouped_weight_grad(u, dz, offsets), grouped_weight_grad(h, g, offsets)
            db1 = None if b1 is None else b1.new_zeros(E, b1.shape[1]).index_add(0, row_experts, dz)
            db2 = None if b2 is None else b2.new_zeros(E, b2.shape[1]).index_add(0, row_experts, g)
            du = grouped_linear(dz, w1.transpose(1, 2), None, offsets)
            dx = torch.zeros_like(x).index_add(0, tokens, du)
        return dx, dweights, dw1, dw2, db1, db2, None, None, None, None


def moe_mlp(x: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``moe_mlp`` for a checked routing (see ``_device_checks.check_routing``)."""
    order = routing.sorted_assignments
    row_experts = routing.experts.reshape(-1).index_select(0, order)  # the expert of each sorted row
    return _ExpertLoop.apply(x, routing.weights, w1, w2, b1, b2, order, routing.expert_offsets, row_experts,
                             activation)

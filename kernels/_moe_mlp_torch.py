"""The "torch" backend of ``moe_mlp``: GEMMs per expert on contiguous slices of the assignments
sorted by expert (host offsets, no per-expert search; biases fused into addmm), everything else
once over all of them, and a hand-written backward.

With the N = T*k assignments sorted by expert (token t_a, weight w_a, expert e_a):

    u = x[t],  z = u @ w1[e] + b1[e],  h = act(z),  o = h @ w2[e] + b2[e],  y[t_a] += w_a * o_a

Kept for backward: the inputs (x, the routing weights and order, the parameters) and z, which
costs k * H(or 2H) values per token against the eager loop's u, z, h and o; u and h are
recomputed from x and z there. With g = dy[t] and q = g @ w2[e]^T:

    dw_a = q_a . h_a + g_a . b2[e_a]       (dy . o without recomputing o)
    dW2[e] = h^T (w g),  db2[e] = sum_a w_a g_a,  dh = w q
    dz = act'(z) dh,  dW1[e] = u^T dz,  db1[e] = sum_a dz_a,  dx[t_a] += dz_a @ w1[e]^T
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .activations import activate, activation_backward
from .routing import Routing


def _slices(offsets: tuple[int, ...]):
    """(e, lo, hi) of every expert with assignments."""
    return ((e, lo, hi) for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if hi > lo)


def _linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, offsets: tuple[int, ...]) -> torch.Tensor:
    """[N, out]: a[lo:hi] @ w[e] + b[e] for every expert's slice (rows of empty experts: none)."""
    out = a.new_empty(a.shape[0], w.shape[2])
    for e, lo, hi in _slices(offsets):
        if b is None:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
        else:
            torch.addmm(b[e], a[lo:hi], w[e], out=out[lo:hi])
    return out


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, b1, b2, order, offsets, activation):
        T, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):  # moe_mlp already cast to the autocast dtype
            tokens = order // k
            z = _linear(x.index_select(0, tokens), w1, b1, offsets)
            h = activate(z, activation)
            o = _linear(h, w2, b2, offsets)
            # The combine accumulates in at least float32 (the routing weights' dtype).
            y = torch.zeros(T, w2.shape[2], dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
            y.index_add_(0, tokens, o * weights.reshape(-1)[order, None])
        ctx.save_for_backward(x, weights, w1, w2, b1, b2, order, z)
        ctx.offsets, ctx.activation = offsets, activation
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weights, w1, w2, b1, b2, order, z = ctx.saved_tensors
        offsets = ctx.offsets
        T, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):
            tokens = order // k
            scale = weights.reshape(-1)[order, None].to(x.dtype)
            u, g = x.index_select(0, tokens), dy.to(x.dtype).index_select(0, tokens)
            h = activate(z, ctx.activation)
            q = torch.empty_like(h)
            dw = torch.zeros(T * k, dtype=weights.dtype, device=x.device)
            for e, lo, hi in _slices(offsets):
                torch.mm(g[lo:hi], w2[e].T, out=q[lo:hi])
                if b2 is not None:
                    dw[lo:hi] = g[lo:hi] @ b2[e]
            dw += (q * h).sum(dim=-1, dtype=weights.dtype)
            dweights = torch.zeros_like(dw).index_copy_(0, order, dw).view(T, k)
            g.mul_(scale)  # now the gradient of o
            dz = activation_backward(q.mul_(scale), z, ctx.activation)
            # Every expert's rows are written below; those without assignments get zeros here.
            idle = [e for e in range(w1.shape[0]) if offsets[e + 1] == offsets[e]]
            idle = torch.tensor(idle, dtype=torch.long, device=x.device)
            dw1, dw2, db1, db2 = (None if t is None else t.new_empty(t.shape).index_fill_(0, idle, 0)
                                  for t in (w1, w2, b1, b2))
            du = torch.empty_like(u)
            for e, lo, hi in _slices(offsets):
                torch.mm(h[lo:hi].T, g[lo:hi], out=dw2[e])
                torch.mm(u[lo:hi].T, dz[lo:hi], out=dw1[e])
                torch.mm(dz[lo:hi], w1[e].T, out=du[lo:hi])
                if b1 is not None:
                    torch.sum(dz[lo:hi], dim=0, out=db1[e])
                if b2 is not None:
                    torch.sum(g[lo:hi], dim=0, out=db2[e])
            dx = torch.zeros_like(x).index_add_(0, tokens, du)
        return dx, dweights, dw1, dw2, db1, db2, None, None, None


def moe_mlp(x: torch.Tensor, routing: Routing, offsets: tuple[int, ...], w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``moe_mlp`` for a checked routing whose expert offsets, read on the host, are ``offsets``."""
    return _ExpertLoop.apply(x, routing.weights, w1, w2, b1, b2, routing.sorted_assignments, offsets, activation)

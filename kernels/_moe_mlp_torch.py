"""The "torch" backend of ``moe_mlp``: GEMMs per expert on contiguous slices of the assignments
sorted by expert (host offsets, no per-expert search), everything else once over all of them,
and a hand-written backward.

With the N = T*k assignments sorted by expert (token t_a, weight w_a, expert e_a):

    u = x[t],  z = u @ w1[e] + b1[e],  h = act(z),  o = h @ w2[e] + b2[e],  y[t_a] += w_a * o_a

Only the inputs are kept for backward (x, the routing weights and order, the parameters);
z and h are recomputed from u there. With g = dy[t] and q = g @ w2[e]^T:

    dw_a = q_a . h_a + g_a . b2[e_a]       (dy . o without recomputing o)
    dW2[e] = h^T (w g),  db2[e] = sum_a w_a g_a,  dh = w q
    dz = act'(z) dh,  dW1[e] = u^T dz,  db1[e] = sum_a dz_a,  dx[t_a] += dz_a @ w1[e]^T
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .routing import Routing


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z); for swiglu z = [gate | up] along the last axis and act(z) = silu(gate) * up."""
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(z)  # exact (erf) GELU
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z) if activation == "silu" else F.relu(z)


def activation_backward(dh: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """dz = act'(z) dh for ``activate`` (swiglu: d gate = silu'(gate) up dh, d up = silu(gate) dh)."""
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)], dim=-1)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(dh, z, approximate="none" if activation == "gelu" else "tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(dh, z)
    return torch.ops.aten.threshold_backward(dh, z, 0)


def grouped_mm_ends(offsets: tuple[int, ...], *tensors: torch.Tensor) -> torch.Tensor | None:
    """The group ends (int32) for ``torch._grouped_mm`` when it can run these GEMMs: on the CPU,
    float32/bfloat16/float16, every row 16-byte aligned (torch 2.13); None for the loop instead."""
    a = tensors[0]
    if not (hasattr(torch, "_grouped_mm") and a.device.type == "cpu"
            and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)):
        return None
    return torch.tensor(offsets[1:], dtype=torch.int32)


def _grouped(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor | None, offsets: tuple[int, ...],
             transpose: bool = False) -> torch.Tensor:
    """[N, out]: rows lo:hi of ``a`` (one expert's slice) times w[e], or w[e]^T."""
    w = w.transpose(1, 2) if transpose else w
    if ends is not None:
        return torch._grouped_mm(a, w, offs=ends)
    out = a.new_zeros(a.shape[0], w.shape[2])
    for e, lo, hi in _slices(offsets):
        torch.mm(a[lo:hi], w[e], out=out[lo:hi])
    return out


def _weight_grad(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor | None, offsets: tuple[int, ...]) -> torch.Tensor:
    """[E, A, B]: a[lo:hi]^T b[lo:hi] for every expert's slice (zero for an expert without one)."""
    if ends is not None:
        return torch._grouped_mm(a.T, b, offs=ends)
    out = a.new_zeros(len(offsets) - 1, a.shape[1], b.shape[1])
    for e, lo, hi in _slices(offsets):
        torch.mm(a[lo:hi].T, b[lo:hi], out=out[e])
    return out


def _slices(offsets: tuple[int, ...]):
    """(e, lo, hi) of every expert with assignments."""
    return ((e, lo, hi) for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])) if hi > lo)


def _add_bias(a: torch.Tensor, b: torch.Tensor | None, offsets: tuple[int, ...]) -> torch.Tensor:
    """a[lo:hi] += b[e] for every expert's slice (no [N, out] gather of the bias rows)."""
    if b is not None:
        for e, lo, hi in _slices(offsets):
            a[lo:hi] += b[e]
    return a


def _bias_grad(a: torch.Tensor, like: torch.Tensor | None, offsets: tuple[int, ...]) -> torch.Tensor | None:
    """db[e] = sum of a's rows lo:hi, None without a bias."""
    if like is None:
        return None
    db = torch.zeros_like(like)
    for e, lo, hi in _slices(offsets):
        torch.sum(a[lo:hi], dim=0, out=db[e])
    return db


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, b1, b2, order, offsets, activation):
        T, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):  # moe_mlp already cast to the autocast dtype
            tokens = order // k
            ends = grouped_mm_ends(offsets, x, w1, w2)
            h = activate(_add_bias(_grouped(x.index_select(0, tokens), w1, ends, offsets), b1, offsets), activation)
            o = _add_bias(_grouped(h, w2, ends, offsets), b2, offsets)
            y = torch.zeros(T, w2.shape[2], dtype=torch.float32, device=x.device)
            y.index_add_(0, tokens, o * weights.reshape(-1)[order, None])
        ctx.save_for_backward(x, weights, w1, w2, b1, b2, order)
        ctx.offsets, ctx.activation = offsets, activation
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weights, w1, w2, b1, b2, order = ctx.saved_tensors
        offsets = ctx.offsets
        T, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):
            tokens = order // k
            scale = weights.reshape(-1)[order, None].to(x.dtype)
            u, g = x.index_select(0, tokens), dy.to(x.dtype).index_select(0, tokens)
            ends = grouped_mm_ends(offsets, x, w1, w2)
            z = _add_bias(_grouped(u, w1, ends, offsets), b1, offsets)
            h = activate(z, ctx.activation)
            q = _grouped(g, w2, ends, offsets, transpose=True)
            dw = (q * h).sum(dim=-1, dtype=torch.float32)
            if b2 is not None:
                for e, lo, hi in _slices(offsets):
                    dw[lo:hi] += (g[lo:hi] @ b2[e]).float()
            dweights = torch.zeros_like(dw).index_copy_(0, order, dw).view(T, k)
            g.mul_(scale)  # now the gradient of o
            dz = activation_backward(q.mul_(scale), z, ctx.activation)
            dw1, dw2 = _weight_grad(u, dz, ends, offsets), _weight_grad(h, g, ends, offsets)
            db1, db2 = _bias_grad(dz, b1, offsets), _bias_grad(g, b2, offsets)
            dx = torch.zeros_like(x).index_add_(0, tokens, _grouped(dz, w1, ends, offsets, transpose=True))
        return dx, dweights, dw1, dw2, db1, db2, None, None, None


def moe_mlp(x: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    offsets = routing.host_offsets or tuple(routing.expert_offsets.tolist())
    return _ExpertLoop.apply(x, routing.weights, w1, w2, b1, b2, routing.sorted_assignments,
                             offsets, activation)

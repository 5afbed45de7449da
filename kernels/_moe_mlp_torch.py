"""The "torch" backend of ``moe_mlp``: two grouped GEMM ops over the assignments sorted by expert
(biases fused into addmm), everything else once over all of them with static shapes, and a
hand-written backward.

With the N = T*k assignments sorted by expert (token t_a, weight w_a, expert e_a):

    u = x[t],  z = u @ w1[e] + b1[e],  h = act(z),  o = h @ w2[e] + b2[e],  y[t_a] += w_a * o_a

Kept for backward: the inputs (x, the routing order, the parameters), the token and the weight
w_a of each sorted row and z, which costs k * H(or 2H) values per token against the eager loop's
u, z, h and o; u and h are recomputed from x and z there (h together with act'(z) dh, one pass
over z). With g = dy[t] and q = g @ w2[e]^T:

    dw_a = q_a . h_a + g_a . b2[e_a]       (dy . o without recomputing o)
    dW2[e] = h^T (w g),  db2[e] = sum_a w_a g_a,  dh = w q  (= (w g) @ w2[e]^T)
    dz = act'(z) dh,  dW1[e] = u^T dz,  db1[e] = sum_a dz_a,  dx[t_a] += dz_a @ w1[e]^T

Only the gradients asked for are computed; without dw (routing weights that need no gradient)
dh is taken as (w g) @ w2[e]^T, with no q.

The grouped GEMMs are two custom ops, ``grouped_linear`` ([N, in] rows by expert segment times
w[e]) and ``grouped_weight_grad`` (per expert a[seg]^T g[seg]). Their outputs have static shapes,
so torch.compile traces the whole op with fullgraph=True, dynamic shapes included, and no
data-dependent size reaches the graph. Inside, each runs ``torch._grouped_mm`` where that takes
the operands (``_native``: on the CPU, float32/bfloat16/float16, 16-byte aligned strides, no
bias; measured 25-35% faster than a slice loop at the benchmark shapes) and otherwise reads the
E group ends and multiplies slice by slice (float64, odd widths, biases fused into addmm,
other devices), as transformers' ``grouped_mm`` fallback does. In eager mode the ops' functions
run directly (no custom-op dispatch) and that choice is made once per call from the two weights
(``call_plan``, ``native_call``), not before each of the six products.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._autocast import autocast_off
from .activations import activate, activate_and_backward
from ._device_checks import refuse_unless
from ._routing_torch import dispatch
from .routing import Routing


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _native(a: torch.Tensor, b: torch.Tensor, out_row: int) -> bool:
    """Whether ``torch._grouped_mm`` takes operands ``a``, ``b`` and an output of rows of
    ``out_row`` values: on the CPU (its kernel there has no float64 and wants every stride but the
    unit one, the output's row and the data pointers on 16 bytes). Plain loops: under
    torch.compile this runs inside each grouped op (eager calls decide once, ``native_call``)."""
    if not _HAS_GROUPED_MM or out_row * a.element_size() % 16:
        return False
    for t in (a, b):
        if t.device.type != "cpu" or t.dtype not in _NATIVE_DTYPES or t.data_ptr() % 16:
            return False
        size = t.element_size()
        for stride in t.stride():
            if stride != 1 and stride * size % 16:
                return False
    return True


def native_call(w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """``_native`` for every grouped product of one eager call at once. Besides w1 and w2 (and
    their transposes, which have the same strides) the products only see tensors this module
    allocates (contiguous, so their data pointers are on the CPU allocator's 64 bytes) or their
    transposes, whose strides and rows are the widths D, H (or 2H), H and D_out; so the widths,
    the weights' strides (the unit one aside) and data pointers must be whole multiples of 16
    bytes. One flat test per call (``_native`` per product costs about 4 us each on the CPU)."""
    if not (_HAS_GROUPED_MM and w1.is_cpu and w2.is_cpu and w1.dtype in _NATIVE_DTYPES and w2.dtype == w1.dtype):
        return False
    # A multiple of 16 bytes is a multiple of m = 16 / element size values (2 or 4 bytes here):
    # every width and stride is exactly when their greatest common divisor is.
    strides = [n for n in (*w1.stride(), *w2.stride()) if n != 1]
    return (not (w1.data_ptr() % 16 or w2.data_ptr() % 16)
            and math.gcd(*w1.shape[1:], *w2.shape[1:], *strides) % (16 // w1.element_size()) == 0)


def group_ends(offsets: torch.Tensor) -> torch.Tensor:
    """The E group ends offsets[1:] as int32: ``torch._grouped_mm``'s offs, and what the grouped
    ops below take (computed once per forward and backward)."""
    return offsets[1:].to(torch.int32)


def _bounds(ends: torch.Tensor) -> list[tuple[int, int, int]]:
    """(e, lo, hi) of every expert, rows lo:hi; the op's one read of the group ends."""
    bounds = [0] + ends.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]


def _grouped_linear(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], ends: torch.Tensor
                    ) -> torch.Tensor:
    """[N, out]: a[lo:hi] @ w[e] + b[e] for every expert's rows lo:hi (``ends`` [E] int32, the
    group ends of offsets from 0 to N, checked by ``moe_mlp``)."""
    return _grouped_linear_on(a, w, b, ends, b is None and _native(a, w, w.shape[2]))


def _grouped_linear_on(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], ends: torch.Tensor,
                       native: bool) -> torch.Tensor:
    """``_grouped_linear`` by ``torch._grouped_mm`` (``native``, no bias) or slice by slice."""
    if native:
        return torch._grouped_mm(a, w, offs=ends)
    out = a.new_empty(a.shape[0], w.shape[2])
    for e, lo, hi in _bounds(ends):
        if hi == lo:
            continue
        if b is None:
            torch.mm(a[lo:hi], w[e], out=out[lo:hi])
        else:
            torch.addmm(b[e], a[lo:hi], w[e], out=out[lo:hi])
    return out


_grouped_linear_op = torch.library.custom_op("moe_restore::grouped_linear", _grouped_linear, mutates_args=())


@_grouped_linear_op.register_fake
def _(a, w, b, ends):
    return a.new_empty(a.shape[0], w.shape[2])


def _weight_grad_like(a: torch.Tensor, g: torch.Tensor, num_experts: int, transposed: bool) -> torch.Tensor:
    """An uninitialised [E, in, out] gradient, laid out as its weight: a weight stored [E, out, in]
    and used transposed (transformers' experts) gets its gradient in that storage order, so that
    accumulating it into the parameter's .grad is a contiguous add."""
    if transposed:
        return a.new_empty(num_experts, g.shape[1], a.shape[1]).transpose(1, 2)
    return a.new_empty(num_experts, a.shape[1], g.shape[1])


def _grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, ends: torch.Tensor, transposed: bool
                         ) -> torch.Tensor:
    """[E, in, out]: a[lo:hi]^T @ g[lo:hi] per expert (zeros for an expert without rows), stored
    [E, out, in] when ``transposed`` (see ``_weight_grad_like``)."""
    return _grouped_weight_grad_on(a, g, ends, transposed, _native(a, g, a.shape[1] if transposed else g.shape[1]))


def _grouped_weight_grad_on(a: torch.Tensor, g: torch.Tensor, ends: torch.Tensor, transposed: bool, native: bool
                            ) -> torch.Tensor:
    """``_grouped_weight_grad`` by ``torch._grouped_mm`` (``native``) or slice by slice."""
    # Groups split the shared axis N; an empty group's product is zeros.
    if native:
        if transposed:
            return torch._grouped_mm(g.T, a, offs=ends).transpose(1, 2)
        return torch._grouped_mm(a.T, g, offs=ends)
    out = _weight_grad_like(a, g, ends.shape[0], transposed)
    for e, lo, hi in _bounds(ends):
        if hi > lo:
            torch.mm(a[lo:hi].T, g[lo:hi], out=out[e])
        else:
            out[e].zero_()
    return out


_grouped_weight_grad_op = torch.library.custom_op("moe_restore::grouped_weight_grad", _grouped_weight_grad,
                                                  mutates_args=())


@_grouped_weight_grad_op.register_fake
def _(a, g, ends, transposed):
    return _weight_grad_like(a, g, ends.shape[0], transposed)


def call_plan(w1: torch.Tensor, w2: torch.Tensor) -> bool | None:
    """How one call runs its grouped products: None where torch.compile traces (each through its
    custom op, which decides inside whether ``torch._grouped_mm`` takes the operands), else the
    eager call's decision ``native_call`` (the functions themselves, without the op's dispatch
    cost). Asked once per forward; the backward reuses the answer."""
    return None if torch.compiler.is_compiling() else native_call(w1, w2)


def grouped_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ends: torch.Tensor,
                   native: bool | None) -> torch.Tensor:
    """``_grouped_linear`` as ``native`` (``call_plan``) says."""
    if native is None:
        return _grouped_linear_op(a, w, b, ends)
    return _grouped_linear_on(a, w, b, ends, native and b is None)


def grouped_weight_grad(a: torch.Tensor, g: torch.Tensor, ends: torch.Tensor, transposed: bool,
                        native: bool | None) -> torch.Tensor:
    """``_grouped_weight_grad`` as ``native`` (``call_plan``) says."""
    if native is None:
        return _grouped_weight_grad_op(a, g, ends, transposed)
    return _grouped_weight_grad_on(a, g, ends, transposed, native)


def _stored_transposed(w: torch.Tensor) -> bool:
    """Whether the [E, in, out] weight ``w`` is a transposed view of contiguous [E, out, in]
    storage (read off its strides: no transposed view is made to ask)."""
    (E, n_in, n_out), (s_e, s_in, s_out) = w.shape, w.stride()
    return not w.is_contiguous() and ((E == 1 or s_e == n_in * n_out) and (n_in == 1 or s_in == 1)
                                      and (n_out == 1 or s_out == n_in))


def _forward(x, weights, w1, w2, b1, b2, order, ends, activation, native
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, D_out] in x's dtype, z [N, H or 2H], the token t_a and the weight w_a (a column
    [N, 1]) of each sorted row) of the module docstring's forward. Runs with autocast off: both
    entries of ``moe_mlp`` call it inside ``autocast_off``, on inputs cast to the autocast dtype."""
    T, k = weights.shape
    tokens = torch.div(order, k, rounding_mode="floor")
    scale = weights.take(order[:, None])  # w_a = weights.flat[a], as the column that scales o
    z = grouped_linear(x.index_select(0, tokens), w1, b1, ends, native)
    o = grouped_linear(activate(z, activation), w2, b2, ends, native)
    # The combine accumulates in at least float32 (the routing weights' dtype), in place into
    # fresh zeros (an out-of-place index_add would copy them first).
    y = torch.zeros(T, w2.shape[2], dtype=_combine_dtype(x.dtype, weights.dtype), device=x.device)
    y.index_add_(0, tokens, o * scale)
    return y.to(x.dtype), z, tokens, scale


def _combine_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` of two float dtypes, without a dispatched op: the wider one, and
    float32 for float16 with bfloat16."""
    if a.itemsize != b.itemsize:
        return a if a.itemsize > b.itemsize else b
    return a if a == b else torch.float32


# Measured on torch 2.11.0 (the oldest supported): a compiled call of ``_ExpertLoop`` (Dynamo alone,
# backend "eager", fullgraph) gives the right forward and all-zero gradients; torch 2.13 is right.
# torch 2.12 was not tried, so it is treated like 2.11.
COMPILED_BACKWARD_IS_WRONG = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, w2, b1, b2, order, ends, activation, native):  # native: call_plan
        y, z, tokens, scale = _forward(x, weights, w1, w2, b1, b2, order, ends, activation, native)
        ctx.save_for_backward(x, w1, w2, b1, b2, order, tokens, ends, z, scale)
        ctx.activation, ctx.weights_shape, ctx.weights_dtype = activation, weights.shape, weights.dtype
        ctx.native = native
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w1, w2, b1, b2, order, tokens, ends, z, scale = ctx.saved_tensors
        native = None if torch.compiler.is_compiling() else ctx.native  # the forward's call_plan
        # Only the gradients asked for (e.g. no dweights for routing weights that need none).
        need_x, need_weights, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:6]
        dx = dweights = dw1 = dw2 = db1 = db2 = None
        with autocast_off(x.device.type):
            s = scale.to(x.dtype)
            g = dy.to(x.dtype).index_select(0, tokens)
            if need_weights:
                q = grouped_linear(g, w2.transpose(1, 2), None, ends, native)
                h, dz = activate_and_backward(q * s, z, ctx.activation)
                dw = (q * h).sum(dim=-1, dtype=ctx.weights_dtype)
                if b2 is not None:  # g_a . b2[e_a], as one grouped product with a single output column
                    # (one output column: never torch._grouped_mm's 16-byte rows; compiled, the op)
                    dw = dw + grouped_linear(g, b2[:, :, None], None, ends, None if native is None else False)[:, 0]
                # order is a permutation: every entry is written, so no zeros first.
                dweights = torch.empty_like(dw).index_copy_(0, order, dw).view(ctx.weights_shape)
                g = g * s  # the gradient of o
            else:  # no q needed: dh = (w g) @ w2^T, so the scale multiplies g alone (no [N, H] pass)
                g = g * s
                h, dz = activate_and_backward(grouped_linear(g, w2.transpose(1, 2), None, ends, native), z,
                                              ctx.activation)
            if need_w1:
                dw1 = grouped_weight_grad(x.index_select(0, tokens), dz, ends, _stored_transposed(w1), native)
            if need_w2:
                dw2 = grouped_weight_grad(h, g, ends, _stored_transposed(w2), native)
            if need_b1 or need_b2:
                # The expert of each sorted row p: the number of group ends <= p.
                rows = torch.arange(order.shape[0], device=order.device, dtype=torch.int32)
                row_experts = torch.searchsorted(ends, rows, right=True)
                E = w1.shape[0]
                db1 = b1.new_zeros(E, b1.shape[1]).index_add_(0, row_experts, dz) if need_b1 else None
                db2 = b2.new_zeros(E, b2.shape[1]).index_add_(0, row_experts, g) if need_b2 else None
            if need_x:
                du = grouped_linear(dz, w1.transpose(1, 2), None, ends, native)
                dx = torch.zeros_like(x).index_add_(0, tokens, du)
        return dx, dweights, dw1, dw2, db1, db2, None, None, None, None


def _run(x, weights, w1, w2, b1, b2, order, ends, activation) -> torch.Tensor:
    """The op on assignments sorted by expert (``order`` [N], group ends ``ends`` [E] int32);
    without autograd (inference) the forward alone, which keeps nothing."""
    if order.numel() > torch.iinfo(torch.int32).max:
        raise ValueError(f"moe_mlp's torch backend takes at most 2**31 - 1 assignments (T*k), got {order.numel()}")
    inputs = (x, weights, w1, w2, b1, b2)
    native = call_plan(w1, w2)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        return _forward(*inputs, order, ends, activation, native)[0]
    if COMPILED_BACKWARD_IS_WRONG and torch.compiler.is_compiling():
        raise NotImplementedError(
            "moe_mlp's torch backend with autograd under torch.compile needs torch >= 2.13: on torch "
            f"{torch.__version__} Dynamo's trace of its backward returns zero gradients. Compile without "
            "fullgraph (this call then runs eagerly), run it eagerly, or use backend='triton' on a GPU")
    return _ExpertLoop.apply(*inputs, order, ends, activation, native)


def moe_mlp(x: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``moe_mlp`` for a checked routing (see ``_device_checks.check_routing``)."""
    return _run(x, routing.weights, w1, w2, b1, b2, routing.sorted_assignments,
                group_ends(routing.expert_offsets), activation)


def topk_moe_mlp(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None, activation: str
                 ) -> torch.Tensor:
    """``moe_mlp`` of ``routing_from_topk(experts, weights, E, repeats=True)`` for checked
    parameters, without building the Routing: the dispatch gives the int32 group ends directly,
    and its one check is the ids' range (a row may repeat an expert: every slot is its own
    assignment, summed)."""
    E = w1.shape[0]
    order, offsets = dispatch(experts, E, out_int32=True)
    # offsets[0] counts the ids < 0 and offsets[E] those < E: all are in range exactly when
    # offsets[0] = 0 and offsets[E] = T*k (an id outside would fall in a neighbouring group or none).
    if torch.compiler.is_compiling():
        refuse_unless(offsets[E] - offsets[0] == order.shape[0], f"experts hold ids outside [0, {E})", "torch")
    else:  # read back, as _device_checks' eager rule for the torch backend does, but as the two
        # counts themselves: the flag as a tensor costs four dispatched ops (about 15 us on the CPU)
        below, inside = offsets[::E].tolist()
        if below != 0 or inside != order.shape[0]:
            raise ValueError(f"experts hold ids outside [0, {E})")
    return _run(x, weights.float(), w1, w2, b1, b2, order, offsets[1:], activation)

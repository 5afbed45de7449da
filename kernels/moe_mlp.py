"""Grouped expert MLP over a top-K routing, with the weighted combine back to tokens.

For x [T, D] and a Routing (assignment a = t*k + j to expert e = experts[t, j], weight w_a):

    y[t] = sum_j w_a * ( act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e] )

w1 [E, D, H] (gated activations: [E, D, 2H], gate and up projections, by default the first H
columns the gate and the last H up, act(z) = f(gate) * up); w2 [E, H, D_out]; b1 [E, H or 2H] or
None; b2 [E, D_out] or None; activation one of ``ACTIVATIONS`` or an ``ActivationSpec`` (defined in
``moe_restore.kernels.activations``: "gelu" (exact erf GELU), "gelu_tanh" (the tanh approximation,
as in diffusers' FeedForward), "silu", "relu", "relu2" (squared ReLU), and the gated "swiglu",
"geglu", "geglu_tanh", whose spec may add a clamp limit, a sigmoid slope, an up offset and
interleaved gate/up columns). Differentiable w.r.t. x, w1, w2, b1, b2 and the routing weights (so a loss reaches the
router logits).
"""
from __future__ import annotations

import torch

from . import _moe_mlp_torch
from ._autocast import autocast_inputs, autocast_off
from ._backend import resolve_backend_for_dtype
from ._interpreter import interpreter_dot_is_wrong
from ._device_checks import check_routing
from .validation import check_float, check_has_values, check_ndim, check_same_device, check_shape
from .activations import ACTIVATIONS, Activation, ActivationSpec, check_activation, first_layer_width, is_gated
from .routing import Routing, check_topk, routing_from_topk

__all__ = ["ACTIVATIONS", "ActivationSpec", "moe_mlp"]


def _validate(x, routing, w1, w2, b1, b2, activation) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing (from topk_route or nested_route), got {type(routing).__name__}")
    T, E = _validate_experts(x, w1, w2, b1, b2, activation)
    if routing.num_tokens != T:
        raise ValueError(f"routing is for {routing.num_tokens} tokens but x has T = {T}")
    if routing.num_experts != E:
        raise ValueError(f"routing is over {routing.num_experts} experts but w1/w2 hold E = {E}")
    check_same_device(x=x, w1=w1, w2=w2, b1=b1, b2=b2, weights=routing.weights,
                      sorted_assignments=routing.sorted_assignments)


def _validate_experts(x, w1, w2, b1, b2, activation) -> tuple[int, int]:
    """(T, E) of x and the expert parameters, which must agree in shape and dtype (the caller
    checks their device together with the routing's)."""
    check_float("x", x)
    check_ndim("x", x, 2, "[T, D]")
    check_float("w1", w1)
    check_float("w2", w2)
    check_ndim("w1", w1, 3, "[E, D, H]")
    check_ndim("w2", w2, 3, "[E, H, D_out]")
    T, D = x.shape
    E, H, D_out = w2.shape
    w1_cols, hidden = first_layer_width(activation, H), "2H" if is_gated(activation) else "H"
    check_shape("w1", w1, (E, D, w1_cols), f"[E, D, {hidden}]")
    if not (x.dtype == w1.dtype == w2.dtype):
        raise TypeError(f"x, w1 and w2 must share one dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    b1_layout = f"[E, {hidden}]"
    for name, bias, shape, layout in (("b1", b1, (E, w1_cols), b1_layout), ("b2", b2, (E, D_out), "[E, D_out]")):
        if bias is not None:
            check_float(name, bias)
            check_ndim(name, bias, 2, layout)
            check_shape(name, bias, shape, layout)
            if bias.dtype != x.dtype:
                raise TypeError(f"{name} must have the dtype of x, w1 and w2 ({x.dtype}), got {bias.dtype}")
    return T, E


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """``resolve_backend_for_dtype``, and no bfloat16 on the Triton interpreter (CPU tensors): its
    bfloat16 ``tl.dot`` returns wrong products (``interpreter_dot_is_wrong``), so there ``None``
    takes the torch backend and ``"triton"`` raises TypeError rather than return wrong numbers."""
    interpreted_bf16 = interpreter_dot_is_wrong(x.dtype, x.device)
    if backend is None and interpreted_bf16:
        return "torch"
    backend = resolve_backend_for_dtype(backend, x, "x")
    if backend == "triton" and interpreted_bf16:
        raise TypeError("backend='triton' on CPU tensors runs under the Triton interpreter, whose bfloat16 matrix "
                        "product is wrong; x is bfloat16: use backend='torch' or None, or float16/float32")
    return backend


def moe_mlp(x: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor,
            b1: torch.Tensor | None = None, b2: torch.Tensor | None = None, *,
            activation: Activation = "gelu", backend: str | None = None,
            recompute_hidden: bool = True) -> torch.Tensor:
    """Apply each token's routed experts and combine their outputs; see the module docstring.

    x, w1, w2, b1 and b2 share one float dtype (float16, bfloat16, float32: both backends; float64,
    and bfloat16 on CPU tensors under the Triton interpreter: the torch backend only, which
    ``backend=None`` then picks; ``backend="triton"`` raises TypeError). The Routing's tensors may
    be strided views. Under ``torch.autocast`` x and the expert parameters are cast to the autocast
    dtype, which the output then has (the routing weights stay float32; see the autocast policy in
    ``_autocast``). An inconsistent ``routing`` (e.g. built by hand, offsets that disagree with its
    assignments) is refused before any kernel reads it: ValueError on the torch backend, a
    device-side assert on the Triton path (ValueError under the interpreter), and a device-side
    assert under torch.compile; see ``_device_checks``.

    ``recompute_hidden`` trades memory for FLOPs on the Triton grouped path (the one every width
    above the fused path's takes, e.g. D=768, H=3072). True (the default, memory-lean): autograd
    keeps only the inputs and the routing, and the backward recomputes the pre-activation
    z = x W1 + b1, one GEMM more than the forward's. False: the forward also stores z, T*k rows of
    W1's width (H, or 2H gated) in x's dtype, which autograd keeps until backward and the backward
    reads instead: k * W1's width * itemsize bytes more per token kept (S2, bf16: 12,288), the
    step's FLOPs at the floor's 3x the forward's. The result is the same either way but for the
    rounding of z to x's dtype. Ignored on the fused path (small widths, where the hidden layer never
    reaches global memory and storing z would add the [T*k, H] traffic that path avoids), on the
    torch backend (which always keeps z), and for a gated activation (swiglu, geglu, ...) where the
    grouped kernels take their unaligned tiles (a width or stride off a multiple of 16, float32, a
    clamp or softcap), which measured over the register limit with z kept; bool, else TypeError.
    """
    check_float("x", x)
    check_has_values("x", x)
    if not isinstance(recompute_hidden, bool):
        raise TypeError(f"recompute_hidden must be a bool, got {type(recompute_hidden).__name__}")
    x, w1, w2, b1, b2 = autocast_inputs(x, w1, w2, b1, b2)
    with autocast_off(x.device.type):
        return _moe_mlp(x, routing, w1, w2, b1, b2, activation, backend, recompute_hidden=recompute_hidden)


def _moe_mlp(x, routing, w1, w2, b1, b2, activation: Activation, backend: str | None, *,
             recompute_hidden: bool = True) -> torch.Tensor:
    activation = check_activation(activation)  # the canonical string, which the custom op carries
    _validate(x, routing, w1, w2, b1, b2, activation)
    backend = resolve_backend(backend, x)
    if x.shape[0] == 0:
        # Empty, but attached to the graph so that every input gets a (zero) gradient.
        return x.new_zeros(0, w2.shape[2]) + sum(0 * t.sum() for t in (x, w1, w2, b1, b2) if t is not None)
    check_routing(routing, backend)
    if backend == "torch":
        return _moe_mlp_torch.moe_mlp(x, routing, w1, w2, b1, b2, activation)
    from ._moe_mlp_triton import moe_mlp_forward, use_fused_path

    fused = use_fused_path(x.shape[1], w2.shape[2], activation, x.dtype)
    # The kernels read the dispatch layout with unit stride (x and the parameters through their
    # strides): a strided view of it, as a Routing built from slices holds, is copied first.
    y, _ = moe_mlp_forward(x, routing.weights, w1, w2, b1, b2, routing.sorted_assignments.contiguous(),
                           routing.expert_offsets.contiguous(), activation, fused, not recompute_hidden)
    return y  # z, where kept, lives on in autograd's saved tensors


def moe_mlp_topk(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None, *,
                 activation: Activation = "gelu", backend: str | None = None) -> torch.Tensor:
    """``moe_mlp(x, routing_from_topk(experts, weights, E), w1, w2, b1, b2)`` in one call, for a
    top-k choice made elsewhere (a model's own router, as transformers' experts hook passes it):
    experts [T, k] integer ids in [0, E), weights [T, k] float (used as float32, differentiable).

    On the torch backend no Routing is built: the arguments are checked once, the dispatch is
    computed inside, and a row may name an expert more than once (every slot its own assignment,
    summed, as ``routing_from_topk(repeats=True)``); an id outside [0, E) is refused (ValueError
    in eager mode, an assert under torch.compile). On the Triton backend it is
    ``routing_from_topk`` (ids distinct in each row) then ``moe_mlp``. Autocast and dtypes as for
    ``moe_mlp``.
    """
    check_float("x", x)
    check_has_values("x", x)
    x, w1, w2, b1, b2 = autocast_inputs(x, w1, w2, b1, b2)
    with autocast_off(x.device.type):
        activation = check_activation(activation)
        T, E = _validate_experts(x, w1, w2, b1, b2, activation)
        check_topk(experts, weights)
        if experts.shape[0] != T:
            raise ValueError(f"experts hold a choice for {experts.shape[0]} tokens but x has T = {T}")
        check_same_device(x=x, w1=w1, w2=w2, b1=b1, b2=b2, experts=experts)
        backend = resolve_backend(backend, x)
        if backend != "torch" or T == 0:
            return _moe_mlp(x, routing_from_topk(experts, weights, E, backend=backend), w1, w2, b1, b2, activation,
                            backend)
        return _moe_mlp_torch.topk_moe_mlp(x, experts, weights, w1, w2, b1, b2, activation)

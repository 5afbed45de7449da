"""Sigmoid-gated selective scan: the recurrence of M2IR's Mamba-Style Attention.

Inputs u [B, L, D], f [B, L, D] (decay logits), Bm [B, L, N], Cm [B, L, N]; optional
d_skip [D], z [B, L, D] (output gate logits), h0 [B, D, N]. State h_t in R^{D x N}, float32:

    a_t   = sigmoid(f_t)                                                   # [D], in (0, 1)
    h_t   = a_t[:, None] * h_{t-1} + (1 - a_t)[:, None] * (u_t[:, None] * Bm_t[None, :])
    y_t   = h_t @ Cm_t + d_skip * u_t                                      # h_{-1} = h0 or 0
    out_t = y_t * sigmoid(z_t)      if z is given, else y_t

A token whose gate a_t is near 1 is kept out of the state ("proactive suppression").
``reverse=True`` runs t from L-1 down to 0. With N = 1 and Bm = Cm = 1 this is HGRN,
h = a h + (1 - a) u.

``gated_scan_2d`` scans a [B, H, W, *] grid in one of four orders (row-major or column-major,
forward or reversed) and writes each result back at its token's own (h, w).
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend_for_dtype
from .validation import check_float, check_ndim, check_same_device, check_shape
from ._gated_scan_torch import gated_scan_torch

ORDERS = ("row", "row_reverse", "col", "col_reverse")
MAX_STATE_TRITON = 64  # N beyond this would not fit the kernels' register tile
MAX_BATCH_TRITON = 65535  # the batch is a grid axis of its own


def gated_scan(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
               d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
               h0: torch.Tensor | None = None, reverse: bool = False,
               return_final_state: bool = False, backend: str | None = None):
    """Sigmoid-gated selective scan over sequences (math in the module docstring).

    Args:
        u: inputs [B, L, D]. f: decay logits [B, L, D]. Bm, Cm: [B, L, N]. All one float dtype.
        d_skip: skip weights [D] (any float dtype). z: output gate logits [B, L, D], u's dtype.
        h0: initial state [B, D, N] (any float dtype; used in float32).
        reverse: scan from the last token to the first.
        return_final_state: also return the state after the last visited token.
        backend: "triton", "torch" or None (see ``moe_restore.kernels._backend``); float64
            inputs with ``backend=None`` run on "torch", whose arithmetic is then float64.

    Returns:
        out [B, L, D] in u's dtype, and with ``return_final_state`` the final state
        [B, D, N] (float32; float64 for float64 inputs on the torch backend).
        Differentiable with respect to every tensor argument.
    """
    _check_bool("reverse", reverse)
    _check_bool("return_final_state", return_final_state)
    _check_inputs(u, f, Bm, Cm, d_skip, z, "[B, L, D]", "[B, L, N]")
    batch, _, dim = u.shape
    if h0 is not None:
        check_float("h0", h0)
        check_shape("h0", h0, (batch, dim, Bm.shape[-1]), "[B, D, N]")
    check_same_device(u=u, f=f, Bm=Bm, Cm=Cm, d_skip=d_skip, z=z, h0=h0)
    backend = _pick_backend(backend, u, Bm)

    if backend == "torch":
        out, h_final = gated_scan_torch(u, f, Bm, Cm, d_skip, z, h0, reverse)
    else:
        grid = lambda t: None if t is None else t.unsqueeze(1)  # noqa: E731 - [B, L, C] as a 1 x L grid
        out, h_final = _triton_scan(grid(u), grid(f), grid(Bm), grid(Cm), d_skip, grid(z), h0,
                                    column_major=False, reverse=reverse)
        out = out.squeeze(1)
    return (out, h_final) if return_final_state else out


def gated_scan_2d(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                  order: str = "row", d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """The gated scan over a [B, H, W, *] grid visited in ``order``.

    u, f, z: [B, H, W, D]; Bm, Cm: [B, H, W, N]; d_skip [D]. ``order`` is "row" (row-major),
    "col" (column-major), or either with "_reverse" (the same visit backwards). The state starts
    at zero; out [B, H, W, D] holds each token's result at its own (h, w). The Triton kernels
    read the grid through its strides: no permuted copy.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    _check_inputs(u, f, Bm, Cm, d_skip, z, "[B, H, W, D]", "[B, H, W, N]")
    check_same_device(u=u, f=f, Bm=Bm, Cm=Cm, d_skip=d_skip, z=z)
    backend = _pick_backend(backend, u, Bm)
    column_major, reverse = order.startswith("col"), order.endswith("_reverse")

    if backend == "triton":
        return _triton_scan(u, f, Bm, Cm, d_skip, z, None, column_major, reverse)[0]

    batch, height, width, dim = u.shape

    def to_sequence(t):
        if t is None:
            return None
        return (t.transpose(1, 2) if column_major else t).flatten(1, 2)

    out, _ = gated_scan_torch(to_sequence(u), to_sequence(f), to_sequence(Bm), to_sequence(Cm),
                              d_skip, to_sequence(z), None, reverse)
    if column_major:
        return out.view(batch, width, height, dim).transpose(1, 2)
    return out.view(batch, height, width, dim)


def _triton_scan(u, f, bm, cm, d_skip, z, h0, column_major: bool, reverse: bool):
    from ._gated_scan_triton import gated_scan_forward

    # u, f, z (and the gradients) share one set of strides, Bm and Cm another: contiguous
    # inputs (the usual case) are passed as they are.
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    as_state = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    out, h_final, _, _ = gated_scan_forward(contiguous(u), contiguous(f), contiguous(bm), contiguous(cm),
                                            as_state(d_skip), contiguous(z), as_state(h0), column_major, reverse)
    return out, h_final


def _pick_backend(backend: str | None, u: torch.Tensor, bm: torch.Tensor) -> str:
    backend = resolve_backend_for_dtype(backend, u, "u")
    if backend == "triton":
        if bm.shape[-1] > MAX_STATE_TRITON:
            raise ValueError(f"Bm: the Triton kernels take a state size N <= {MAX_STATE_TRITON}, "
                             f"got {bm.shape[-1]} (use backend='torch')")
        if u.shape[0] > MAX_BATCH_TRITON:
            raise ValueError(f"u: the Triton kernels take a batch <= {MAX_BATCH_TRITON}, got {u.shape[0]}")
    return backend


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_inputs(u, f, bm, cm, d_skip, z, layout: str, state_layout: str) -> None:
    ndim = layout.count(",") + 1
    check_float("u", u)
    check_ndim("u", u, ndim, layout)
    if any(size == 0 for size in u.shape):
        raise ValueError(f"u must have no empty dimension, got shape {tuple(u.shape)}")
    check_float("Bm", bm)
    check_ndim("Bm", bm, ndim, state_layout)
    if bm.shape[-1] == 0:
        raise ValueError("Bm must have a state size N >= 1, got 0")
    tokens = tuple(u.shape[:-1])
    for name, t, shape, where in (("f", f, u.shape, layout), ("z", z, u.shape, layout),
                                  ("Cm", cm, bm.shape, state_layout),
                                  ("Bm", bm, (*tokens, bm.shape[-1]), state_layout)):
        if t is None:
            continue
        check_float(name, t)
        check_shape(name, t, tuple(shape), where)
        if t.dtype != u.dtype:
            raise TypeError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
    if d_skip is not None:
        check_float("d_skip", d_skip)
        check_shape("d_skip", d_skip, (u.shape[-1],), "[D]")

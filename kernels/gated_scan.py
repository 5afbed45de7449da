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

``gated_scan_2d`` scans a [B, H, W, *] grid in ``order`` "row" (row-major) or "col"
(column-major), forward or (``reverse=True``) backward, and writes each result back at its
token's own (h, w). Both ops take the same arguments (``h0``, ``reverse``,
``return_final_state``) and return alike. The plain reference of both is ``naive.gated_scan``
/ ``naive.gated_scan_2d``.
"""
from __future__ import annotations

import torch

from ._autocast import autocast_inputs, autocast_off
from ._backend import resolve_backend_for_dtype
from .validation import check_bool, check_float, check_has_values, check_ndim, check_same_device, check_shape
from ._gated_scan_torch import gated_scan_torch

ORDERS = ("row", "col")
MAX_STATE_TRITON = 64  # N beyond this would not fit the kernels' register tile
MAX_BATCH_TRITON = 65535  # the batch is a grid axis of its own


def gated_scan(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
               d_skip: torch.Tensor | None = None, z: torch.Tensor | None = None,
               h0: torch.Tensor | None = None, reverse: bool = False,
               return_final_state: bool = False, backend: str | None = None):
    """Sigmoid-gated selective scan over sequences (math in the module docstring).

    Args:
        u: inputs [B, L, D]. f: decay logits [B, L, D]. Bm, Cm: [B, L, N]. All one float dtype.
            L = 0 (or B = 0) is allowed: the output is empty and the final state is h0 (or 0).
        d_skip: skip weights [D] (any float dtype). z: output gate logits [B, L, D], u's dtype.
        h0: initial state [B, D, N] (any float dtype; used in float32).
        reverse: scan from the last token to the first.
        return_final_state: also return the state after the last visited token.
        backend: "triton", "torch" or None (see ``moe_restore.kernels._backend``); float64
            inputs with ``backend=None`` run on "torch", whose arithmetic is then float64.

    Returns:
        out [B, L, D] in u's dtype, or with ``return_final_state`` the pair (out, final state
        [B, D, N]; float32, float64 for float64 inputs on the torch backend). Differentiable with
        respect to every tensor argument. Under ``torch.autocast`` u, f, Bm, Cm and z are cast
        to the autocast dtype first (the policy in ``_autocast``).
    """
    return _scan(u, f, Bm, Cm, d_skip, z, h0, None, reverse, return_final_state, backend)


def gated_scan_2d(u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, *,
                  order: str = "row", reverse: bool = False, d_skip: torch.Tensor | None = None,
                  z: torch.Tensor | None = None, h0: torch.Tensor | None = None,
                  return_final_state: bool = False, backend: str | None = None):
    """The gated scan over a [B, H, W, *] grid visited in ``order``, backwards with ``reverse``.

    u, f, z: [B, H, W, D]; Bm, Cm: [B, H, W, N]; d_skip [D]; h0 [B, D, N]. ``order`` is "row"
    (row-major) or "col" (column-major); ``reverse`` runs the same visit backwards, as in
    ``gated_scan``. out [B, H, W, D] holds each token's result at its own (h, w); arguments,
    return convention and autocast as in ``gated_scan``. The Triton kernels read the grid
    through its strides: no permuted copy.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return _scan(u, f, Bm, Cm, d_skip, z, h0, order, reverse, return_final_state, backend)


def _scan(u, f, bm, cm, d_skip, z, h0, order: str | None, reverse: bool, return_final_state: bool,
          backend: str | None):
    """Both scans: ``order`` None for sequences [B, L, *], else the grid's visit ("row" | "col")."""
    check_bool("reverse", reverse)
    check_bool("return_final_state", return_final_state)
    check_float("u", u)
    check_has_values("u", u)
    u, f, bm, cm, z = autocast_inputs(u, f, bm, cm, z)
    with autocast_off(u.device.type):
        return _scan_cast(u, f, bm, cm, d_skip, z, h0, order, reverse, return_final_state, backend)


def _scan_cast(u, f, bm, cm, d_skip, z, h0, order: str | None, reverse: bool, return_final_state: bool,
               backend: str | None):
    layouts = ("[B, L, D]", "[B, L, N]") if order is None else ("[B, H, W, D]", "[B, H, W, N]")
    _check_inputs(u, f, bm, cm, d_skip, z, *layouts)
    batch, dim = u.shape[0], u.shape[-1]
    if h0 is not None:
        check_float("h0", h0)
        check_shape("h0", h0, (batch, dim, bm.shape[-1]), "[B, D, N]")
    check_same_device(u=u, f=f, Bm=bm, Cm=cm, d_skip=d_skip, z=z, h0=h0)
    backend = _pick_backend(backend, u, bm)

    if u.numel() == 0:
        out, h_final = _empty_scan(u, f, bm, cm, d_skip, z, h0, backend)
    elif backend == "triton":
        grid = (lambda t: t) if order is not None else (lambda t: None if t is None else t.unsqueeze(1))
        out, h_final = _triton_scan(grid(u), grid(f), grid(bm), grid(cm), d_skip, grid(z), h0,
                                    column_major=order == "col", reverse=reverse)
        out = out if order is not None else out.squeeze(1)
    elif order is None:
        out, h_final = gated_scan_torch(u, f, bm, cm, d_skip, z, h0, reverse)
    else:
        # The grid as the sequence of its visit: a view for "row", a transposed copy for "col".
        batch, height, width, _ = u.shape
        column_major = order == "col"

        def to_sequence(t):
            if t is None:
                return None
            return (t.transpose(1, 2) if column_major else t).flatten(1, 2)

        out, h_final = gated_scan_torch(to_sequence(u), to_sequence(f), to_sequence(bm), to_sequence(cm),
                                        d_skip, to_sequence(z), h0, reverse)
        out = out.view(batch, width, height, dim).transpose(1, 2) if column_major else \
            out.view(batch, height, width, dim)
    return (out, h_final) if return_final_state else out


def _empty_scan(u, f, bm, cm, d_skip, z, h0, backend: str):
    """No tokens: an empty output and the final state h0 (or 0), both attached to the graph so that
    every input gets a (zero) gradient."""
    anchor = sum(0 * t.sum() for t in (u, f, bm, cm, d_skip, z) if t is not None)
    state_dtype = torch.float64 if backend == "torch" and u.dtype == torch.float64 else torch.float32
    batch, dim, state = u.shape[0], u.shape[-1], bm.shape[-1]
    h = u.new_zeros(batch, dim, state, dtype=state_dtype) if h0 is None else h0.to(state_dtype)
    return torch.zeros_like(u) + anchor.to(u.dtype), h + anchor.to(state_dtype)


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


def _check_inputs(u, f, bm, cm, d_skip, z, layout: str, state_layout: str) -> None:
    ndim = layout.count(",") + 1
    check_float("u", u)
    check_ndim("u", u, ndim, layout)
    if u.shape[-1] == 0:
        raise ValueError(f"u must have D >= 1 channels, got shape {tuple(u.shape)}")
    check_float("Bm", bm)
    check_ndim("Bm", bm, ndim, state_layout)
    if bm.shape[-1] == 0:
        raise ValueError("Bm must have a state size N >= 1, got 0")
    tokens = tuple(u.shape[:-1])
    # Bm against u's tokens before Cm against Bm, so that a wrong Bm is blamed on Bm.
    for name, t, shape, where in (("f", f, u.shape, layout), ("z", z, u.shape, layout),
                                  ("Bm", bm, (*tokens, bm.shape[-1]), state_layout),
                                  ("Cm", cm, bm.shape, f"{state_layout} (Bm's shape)")):
        if t is None:
            continue
        check_float(name, t)
        check_shape(name, t, tuple(shape), where)
        if t.dtype != u.dtype:
            raise TypeError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
    if d_skip is not None:
        check_float("d_skip", d_skip)
        check_shape("d_skip", d_skip, (u.shape[-1],), "[D]")

"""The ops' shared conventions: the number of choices a routing records, empty sequences and h0
in both scans, one direction argument, the autocast policy and the pinned launch sizes."""
from __future__ import annotations

import warnings

import pytest
import torch

from moe_restore.kernels import gated_scan, gated_scan_2d, naive, nested_route, topk_route
from utils import DEVICE, VISITS, assert_close, backends, scan_2d, scan_inputs

TRITON = [b for b in backends() if b == "triton"]


def test_routing_records_its_number_of_choices():
    gen = torch.Generator().manual_seed(0)
    logits, gl, el = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((6, 5), (6, 3), (6, 3, 4)))
    nested = nested_route(gl, el, top_k_groups=2, top_k_experts=3, backend="torch")
    assert nested.top_k == 6 and nested.top_k_groups == 2 and topk_route(logits, 2).top_k_groups is None


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("visit", ["row", "col_reverse"])
def test_2d_scan_takes_h0_and_returns_the_final_state(backend, visit):
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 3, 5), 4, 3, seed=3)
    order, reverse = VISITS[visit]
    h0 = h0.requires_grad_()
    out, h = gated_scan_2d(u, f, Bm, Cm, order=order, reverse=reverse, d_skip=d_skip, z=z, h0=h0,
                           return_final_state=True, backend=backend)
    h0_64 = h0.detach().double().requires_grad_()
    want_out, want_h = scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, visit, d_skip=d_skip, z=z, h0=h0_64)
    assert_close(out, want_out, torch.float32, backend=backend, what="out")
    assert_close(h, want_h, torch.float32, backend=backend, what="final state")
    (grad,) = torch.autograd.grad(out.sum() + h.sum(), h0)
    (want_grad,) = torch.autograd.grad(want_out.sum() + want_h.sum(), h0_64)
    assert_close(grad, want_grad, torch.float32, backend=backend, what="dh0")


@pytest.mark.parametrize("backend", backends())
def test_empty_sequences(backend):
    """No tokens: an empty output, the final state is h0 (its gradient passes through unchanged)
    and every other input gets a zero gradient."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 0), 4, 3)
    inputs = [t.requires_grad_() for t in (u, f, Bm, Cm, d_skip, z, h0)]
    out, h = gated_scan(*inputs[:4], d_skip=d_skip, z=z, h0=h0, return_final_state=True, backend=backend)
    assert out.shape == (2, 0, 4) and out.dtype == u.dtype and torch.equal(h, h0)
    upstream = torch.randn_like(h)
    grads = torch.autograd.grad((h * upstream).sum(), inputs)
    assert torch.equal(grads[-1], upstream) and all(not g.any() for g in grads[:-1])
    grid = [t.view(2, 0, 5, t.shape[-1]) for t in scan_inputs((2, 0), 4, 3)[:4]]
    out, h = gated_scan_2d(*grid, order="col", return_final_state=True, backend=backend)
    assert out.shape == (2, 0, 5, 4) and h.shape == (2, 4, 3) and not h.any()


@pytest.mark.parametrize("backend", backends())
def test_autocast_policy(backend):
    """Under autocast the scans compute as for inputs of the autocast dtype (mixed input dtypes
    are then fine), and routing reads its logits as given."""
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((1, 9), 4, 2, seed=6)
    dtype = torch.float16
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = gated_scan(u.to(dtype), f, Bm, Cm, d_skip=d_skip, z=z, backend=backend)
        logits = torch.randn(7, 5, device=DEVICE)
        routing = topk_route(logits, 2, backend=backend)
    assert out.dtype == dtype
    assert torch.equal(out, gated_scan(*(t.to(dtype) for t in (u, f, Bm, Cm)), d_skip=d_skip, z=z.to(dtype),
                                       backend=backend))
    plain = topk_route(logits, 2, backend=backend)
    assert torch.equal(routing.experts, plain.experts) and torch.equal(routing.weights, plain.weights)


@pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("variable,value", [("MOE_RESTORE_SCAN_CHUNK", "24"), ("MOE_RESTORE_SCAN_CHUNK", "8"),
                                            ("MOE_RESTORE_SCAN_CARRY_BLOCK", "x")])
def test_bad_pinned_launch_size_is_named(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    u, f, Bm, Cm, *_ = scan_inputs((1, 5), 3, 2)
    with pytest.raises(ValueError, match=variable):
        gated_scan(u, f, Bm, Cm, backend="triton")


@pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
def test_pinned_scan_sizes_give_the_same_scan(monkeypatch):
    """The launch sizes change how the work is cut, not the result (one chunk vs many)."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((1, 40), 3, 2, seed=8)
    many = gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, backend="triton")
    monkeypatch.setenv("MOE_RESTORE_SCAN_CHUNK", "64")
    one = gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, backend="triton")
    assert_close(one, many, torch.float32, backend="triton", what="out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gated_scan(u, f, Bm, Cm, backend="triton")

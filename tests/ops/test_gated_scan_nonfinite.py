"""The scan at the edges of its domain, both backends, against the float64 loop oracle
``naive.gated_scan``: causal under NaN (a NaN at token t reaches no output before t), exact at decay 0
(f = -inf) and 1 (f = +inf), and precise at extreme decay logits (|f| ~ 30-80)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import gated_scan, gated_scan_2d, naive
from utils import assert_close, backends, run_scan, scan_2d, scan_inputs


def assert_same_non_finite(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Finite where the oracle is finite (and close there), non-finite where it is not."""
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: non-finite outputs differ from the oracle's"
    assert_close(out[finite], ref[finite], torch.float32, what=what)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("where", ["u", "f", "Bm", "Cm", "h0"])
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_is_causal(backend, where, reverse):
    """L = 24 crosses chunks (8 tokens): the NaN sits inside a chunk, after earlier tokens of it
    in the visit order."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 24), 6, 3)
    t = 14 if not reverse else 9
    target = {"u": u, "f": f, "Bm": Bm, "Cm": Cm, "h0": h0}[where]
    if where == "h0":
        target[1, 2, 0] = torch.nan
    else:
        target[1, t, 2 if where in ("u", "f") else 0] = torch.nan
    out, h_final = run_scan(backend, u, f, Bm, Cm, d_skip, z, h0, reverse)
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)
    assert ref_out.isnan().any()
    assert_same_non_finite(out, ref_out, "out")
    assert_same_non_finite(h_final, ref_final, "final state")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("reverse", [False, True])
def test_decay_exactly_zero_and_one(backend, reverse):
    """f = -inf (a = 0: the state restarts from the token's own write) and f = +inf (a = 1: the
    token is skipped) are valid limits; whole tokens and single channels, inside and across chunks."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 37), 5, 3)
    inf = torch.inf
    f[0, 3] = -inf
    f[0, 8, 1] = -inf
    f[0, 9:20, 2] = inf
    f[1, 0] = inf
    f[1, 16, 4] = -inf
    f[1, 17, 4] = -inf
    out, h_final = run_scan(backend, u, f, Bm, Cm, d_skip, z, h0, reverse)
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)
    assert_close(out, ref_out, torch.float32, backend=backend, what="out")
    assert_close(h_final, ref_final, torch.float32, backend=backend, what="final state")


@pytest.mark.parametrize("backend", backends())
def test_decay_limits_have_finite_gradients(backend):
    """At f = +-inf the gate's derivative a (1 - a) is 0: every gradient is finite and matches
    the oracle's autograd."""
    u, f, Bm, Cm, _, _, _ = scan_inputs((1, 20), 4, 2)
    f[0, 5] = -torch.inf
    f[0, 11, 2] = torch.inf
    inputs = [t.clone().requires_grad_() for t in (u, f, Bm, Cm)]
    out = gated_scan(*inputs, backend=backend)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in (u, f, Bm, Cm)]
    ref_grads = torch.autograd.grad(naive.gated_scan(*ref_inputs)[0].sum(), ref_inputs)
    for name, g, ref in zip(("u", "f", "Bm", "Cm"), grads, ref_grads):
        ref = torch.nan_to_num(ref, nan=0.0)  # the oracle's autograd: 0 * inf at the limits
        assert_close(g, ref, torch.float32, backend=backend, what=f"d{name}")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scale", [30.0, 80.0])
def test_extreme_decay_logits_over_long_sequences(backend, scale):
    """|f| ~ 30-80 over 520 tokens (two segments of the torch backend): the cumulative log
    decays reach ~1e4, whose float32 differences would lose the per-token precision."""
    length = 520 if backend == "torch" else 130  # interpreter time
    u, f, Bm, Cm, _, _, h0 = scan_inputs((1, length), 3, 2)
    g = torch.Generator().manual_seed(1)
    f = (torch.rand(f.shape, generator=g) * 2 - 1).sign() * scale + torch.randn(f.shape, generator=g)
    # long runs of a ~ 1 between the resets keep every token's contribution visible
    f[..., ::2] = f[..., ::2].abs()
    out, h_final = run_scan(backend, u, f, Bm, Cm, None, None, h0, False)
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, h0=h0)
    assert_close(out, ref_out, torch.float32, backend=backend, what="out")
    assert_close(h_final, ref_final, torch.float32, backend=backend, what="final state")


@pytest.mark.parametrize("backend", backends())
def test_2d_nan_is_causal_in_visit_order(backend):
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((1, 4, 5), 3, 2)
    u[0, 2, 1, 0] = torch.nan  # visited 11th in row order, 6th in column order
    for visit in ("row", "col_reverse"):
        out = scan_2d(gated_scan_2d, u, f, Bm, Cm, visit, d_skip=d_skip, z=z, backend=backend)
        ref = scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, visit, d_skip=d_skip, z=z)[0]
        assert_same_non_finite(out, ref, visit)

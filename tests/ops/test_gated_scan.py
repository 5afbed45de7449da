"""The sigmoid-gated selective scan against the float64 loop written from the issue's equations
(``naive.gated_scan`` / ``naive.gated_scan_2d``).

Both backends are compared with that oracle (not with each other), on odd shapes, with
every optional input, in every visit order, for the outputs, the final state and every gradient.
Triton runs under the interpreter on a CPU: the shapes are small (a few hundred tokens at most).
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_restore.kernels import naive
from moe_restore.kernels.gated_scan import gated_scan, gated_scan_2d
from utils import DEVICE, VISITS, assert_close, backends, poisoned_allocations, run_scan, scan_2d, scan_inputs

TRITON = [b for b in backends() if b == "triton"]


# ---------------------------------------------------------------- forward -----------------
# (B, L, D, N, with d_skip, with z, with h0, reverse): every size of the grid appears,
# every option on and off; L = 1, 5 stay inside one chunk, 64 and 300 cross many.
FORWARD_CASES = [
    (1, 1, 3, 1, False, False, False, False),
    (2, 1, 48, 16, True, True, True, True),
    (2, 5, 3, 4, True, False, True, False),
    (1, 5, 48, 1, False, True, False, True),
    (1, 64, 48, 4, True, True, False, False),
    (2, 64, 3, 16, False, False, True, True),
    (1, 300, 3, 16, True, True, True, False),
    (2, 300, 48, 1, False, True, True, True),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "B{}-L{}-D{}-N{}-d{:d}z{:d}h{:d}r{:d}".format(*c))
def test_forward_matches_reference(backend, case):
    batch, length, dim, state, use_d, use_z, use_h0, reverse = case
    if backend == "triton" and batch * length * dim > 20_000:
        batch = 1  # interpreter time; the B=2 path is covered by the other cases
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((batch, length), dim, state)
    d_skip, z, h0 = (d_skip if use_d else None), (z if use_z else None), (h0 if use_h0 else None)
    out, h_final = run_scan(backend, u, f, Bm, Cm, d_skip, z, h0, reverse)
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)
    assert out.dtype == u.dtype and h_final.dtype == torch.float32
    assert_close(out, ref_out, torch.float32, backend=backend, what="out")
    assert_close(h_final, ref_final, torch.float32, backend=backend, what="final state")


@pytest.mark.parametrize("backend", backends())
def test_extreme_gates_keep_precision(backend):
    """Logits of +-30: a = sigmoid(f) rounds to 1 in float32, yet 1 - a must stay exact
    (a suppressed token still writes (1 - a) u Bm, about 1e-13 of it)."""
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((2, 37), 5, 3, decay_scale=30.0)
    out, h_final = run_scan(backend, u, f, Bm, Cm, None, None, None, False)
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm)
    assert_close(out, ref_out, torch.float32, backend=backend, what="out")
    assert_close(h_final, ref_final, torch.float32, backend=backend, what="final state")


def test_hgrn_special_case():
    """N = 1 and Bm = Cm = 1 is HGRN: h = a h + (1 - a) u, out = h (torch backend, float64)."""
    u, f, *_ = scan_inputs((2, 19), 4, 1, dtype=torch.float64)
    ones = torch.ones(2, 19, 1, dtype=torch.float64, device=DEVICE)
    out = gated_scan(u, f, ones, ones, backend="torch")
    h, expected = torch.zeros_like(u[:, 0]), []
    for t in range(19):
        a = torch.sigmoid(f[:, t])
        h = a * h + (1 - a) * u[:, t]
        expected.append(h)
    assert_close(out, torch.stack(expected, 1), torch.float64, what="HGRN")


def test_torch_backend_float64():
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 45), 6, 5, dtype=torch.float64)
    out, h_final = gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0.double(), reverse=True,
                              return_final_state=True)  # backend None: float64 runs on torch
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=True)
    assert out.dtype == torch.float64
    assert_close(out, ref_out, torch.float64, what="out")
    assert_close(h_final, ref_final, torch.float64, what="final state")


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_backend_across_segments(reverse):
    """The torch backend runs segments of CHUNK * SEGMENT_CHUNKS tokens in a Python loop and the
    chunks inside a segment at once: 1100 tokens make two full segments, a partial third and a
    partial last chunk; the state must carry across all of them, forward and backward."""
    from moe_restore.kernels._gated_scan_torch import CHUNK, SEGMENT_CHUNKS
    length = 1100
    assert 2 * CHUNK * SEGMENT_CHUNKS < length < 3 * CHUNK * SEGMENT_CHUNKS and length % CHUNK
    inputs = [t.double().requires_grad_() for t in scan_inputs((2, length), 3, 2)]
    u, f, Bm, Cm, d_skip, z, h0 = inputs
    out, h_final = gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse,
                              return_final_state=True, backend="torch")
    ref_out, ref_final = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)
    assert_close(out, ref_out, torch.float64, what="out")
    assert_close(h_final, ref_final, torch.float64, what="final state")
    g_out, g_final = torch.randn_like(out), torch.randn_like(h_final)
    grads = torch.autograd.grad((out * g_out).sum() + (h_final * g_final).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (ref_final * g_final).sum(), inputs)
    for name, grad, ref in zip("u f Bm Cm d_skip z h0".split(), grads, ref_grads):
        assert_close(grad, ref, torch.float64, what=f"grad {name}")


@pytest.mark.parametrize("backend", backends())
def test_float16_inputs(backend):
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 40), 20, 4, dtype=torch.float16)
    out, _ = run_scan(backend, u, f, Bm, Cm, d_skip, z, h0, False)
    ref_out, _ = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0)
    assert out.dtype == torch.float16
    assert_close(out, ref_out, torch.float16, backend=backend, what="out")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter's bf16 arithmetic is not the GPU's")
def test_bfloat16_inputs_on_gpu():
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 3000), 96, 16, dtype=torch.bfloat16)
    out, _ = run_scan("triton", u, f, Bm, Cm, d_skip, z, h0, True)
    ref_out, _ = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=True)
    assert_close(out, ref_out, torch.bfloat16, backend="triton", what="out")


# ---------------------------------------------------------------- 2-D orders --------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (8, 8), (7, 13)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_2d_orders_match_reference(backend, grid):
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((2, *grid), 5, 4, seed=sum(grid))
    for i, order in enumerate(VISITS):
        # alternate the optional inputs across orders
        dd, zz = (d_skip, z) if i % 2 == 0 else (None, None)
        with poisoned_allocations():
            out = scan_2d(gated_scan_2d, u, f, Bm, Cm, order, d_skip=dd, z=zz, backend=backend)
        assert out.shape == u.shape
        want = scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, order, d_skip=dd, z=zz)[0]
        assert_close(out, want, torch.float32,
                     backend=backend, what=f"out, order {order}")


@pytest.mark.parametrize("backend", backends())
def test_2d_reads_strided_inputs(backend):
    """Inputs that are views of channel-first tensors (what a conv produces) give the same result."""
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((1, 4, 6), 3, 2)
    strided = [t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for t in (u, f, Bm, Cm, z)]
    out = scan_2d(gated_scan_2d, *strided[:4], "col_reverse", d_skip=d_skip, z=strided[4], backend=backend)
    want = scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, "col_reverse", d_skip=d_skip, z=z)[0]
    assert_close(out, want, torch.float32, backend=backend, what="out")


# ---------------------------------------------------------------- gradients ---------------
def check_gradients(backend, call, reference, inputs, dtype=torch.float32):
    """Gradients of <out, g_out> (+ <final state, g_final>) w.r.t. every input, against the
    float64 oracle's autograd, at ``dtype``'s tolerance. (Each gradient has several elements: the
    error is norm-wise, and a one-element gradient that is a cancelling sum would measure float32
    rounding, not the op.)"""
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    refs = [t.detach().double().requires_grad_() for t in inputs]
    ref_outputs = reference(*refs)
    g = torch.Generator(device=DEVICE).manual_seed(11)
    weights = [torch.randn(r.shape, generator=g, device=DEVICE, dtype=r.dtype) for r in ref_outputs]
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref_outputs, weights)), refs)
    with poisoned_allocations():
        outputs = call(*ours)
        grads = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outputs, weights)), ours)
    for name, grad, ref in zip("u f Bm Cm d_skip z h0".split(), grads, ref_grads):
        assert grad.dtype == ours[0].dtype or name in ("d_skip", "h0")
        assert_close(grad, ref, dtype, backend=backend, what=f"d{name}")


# L40-D80-N12: two channel blocks of the Triton backward (64 lanes, then 16 of 64), whose dBm/dCm
# partials are summed, and L24-D40-N20 two of 32 (its block beyond 16 state lanes); conftest's
# 16-token chunks make L64 and L300 several chunks.
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape, reverse", [((2, 1, 6, 4), False), ((2, 5, 7, 4), True),
                                            ((1, 64, 48, 16), False), ((1, 300, 3, 4), True),
                                            ((2, 40, 80, 12), True), ((1, 24, 40, 20), False)],
                         ids=["L1", "L5-reverse", "L64-D48-N16", "L300-reverse", "L40-D80-N12-reverse",
                              "L24-D40-N20"])
def test_gradients_match_reference(backend, shape, reverse):
    batch, length, dim, state = shape
    inputs = scan_inputs((batch, length), dim, state, seed=length)

    def call(u, f, Bm, Cm, d_skip, z, h0):
        return gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse,
                          return_final_state=True, backend=backend)

    def reference(u, f, Bm, Cm, d_skip, z, h0):
        return naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)

    check_gradients(backend, call, reference, inputs)


@pytest.mark.parametrize("backend", backends())
def test_float16_gradients(backend):
    """float16 inputs: every gradient in its dtype (d_skip and h0 float32) against the float64
    oracle of the same (rounded) inputs, over several chunks, two channel blocks and in reverse."""
    inputs = scan_inputs((2, 40), 80, 12, dtype=torch.float16, seed=8)

    def call(u, f, Bm, Cm, d_skip, z, h0):
        return gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=True, return_final_state=True,
                          backend=backend)

    def reference(u, f, Bm, Cm, d_skip, z, h0):
        return naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=True)

    check_gradients(backend, call, reference, inputs, dtype=torch.float16)


@pytest.mark.parametrize("backend", backends())
def test_gradients_without_optional_inputs(backend):
    """Only u, f, Bm, Cm, and only the output used (no final-state gradient)."""
    inputs = scan_inputs((2, 23), 6, 3, seed=3)[:4]

    def call(u, f, Bm, Cm):
        return (gated_scan(u, f, Bm, Cm, backend=backend),)

    check_gradients(backend, call, lambda *a: naive.gated_scan(*a)[:1], inputs)


@pytest.mark.parametrize("backend", backends())
def test_gradient_through_final_state_only(backend):
    """A loss on the final state alone (as when chaining segments)."""
    inputs = scan_inputs((1, 21), 4, 3, seed=4)

    def call(u, f, Bm, Cm, d_skip, z, h0):
        return (gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, return_final_state=True,
                           backend=backend)[1],)

    ours = [t.detach().clone().requires_grad_() for t in inputs]
    with poisoned_allocations():
        (final,) = call(*ours)
        grads = torch.autograd.grad(final.sum(), ours[:4] + ours[6:], allow_unused=True)
    refs = [t.detach().double().requires_grad_() for t in inputs]
    u64, f64, Bm64, Cm64, d64, z64, h64 = refs
    ref_final = naive.gated_scan(u64, f64, Bm64, Cm64, d_skip=d64, z=z64, h0=h64)[1]
    ref_grads = torch.autograd.grad(ref_final.sum(), refs[:4] + refs[6:], allow_unused=True)
    for name, grad, ref in zip(["u", "f", "Bm", "Cm", "h0"], grads, ref_grads):
        if ref is None:  # Cm does not reach the state
            assert grad is None or not grad.abs().any(), f"d{name} should be zero"
        else:
            assert_close(grad, ref, torch.float32, backend=backend, what=f"d{name}")


@pytest.mark.parametrize("backend", backends())
def test_2d_gradients_match_reference(backend):
    inputs = scan_inputs((2, 3, 5), 4, 3, seed=7)[:6]
    for order in VISITS:
        def call(u, f, Bm, Cm, d_skip, z):
            return (scan_2d(gated_scan_2d, u, f, Bm, Cm, order, d_skip=d_skip, z=z, backend=backend),)

        def reference(u, f, Bm, Cm, d_skip, z):
            return scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, order, d_skip=d_skip, z=z)[:1]

        check_gradients(backend, call, reference, inputs)


# ---------------------------------------------------------------- properties --------------
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 2), height=st.integers(1, 6), width=st.integers(1, 7), dim=st.integers(1, 9),
       state=st.integers(1, 6), order=st.sampled_from(list(VISITS)), use_z=st.booleans(), seed=st.integers(0, 99))
def test_property_random_shapes(batch, height, width, dim, state, order, use_z, seed):
    u, f, Bm, Cm, d_skip, z, _ = scan_inputs((batch, height, width), dim, state, seed=seed)
    z = z if use_z else None
    ref = scan_2d(naive.gated_scan_2d, u, f, Bm, Cm, order, d_skip=d_skip, z=z)[0]
    for backend in backends():
        out = scan_2d(gated_scan_2d, u, f, Bm, Cm, order, d_skip=d_skip, z=z, backend=backend)
        assert_close(out, ref, torch.float32, backend=backend, what=f"out ({backend}, {order})")


@settings(max_examples=4, deadline=None)
@given(length=st.integers(1, 40), dim=st.integers(1, 6), state=st.integers(1, 5), seed=st.integers(0, 99))
def test_property_reverse_is_flip(length, dim, state, seed):
    """reverse=True equals flipping every input along L, scanning forward, flipping back."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, length), dim, state, seed=seed)
    flip = lambda t: t.flip(1)  # noqa: E731
    for backend in backends():
        out = gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=True, backend=backend)
        flipped = gated_scan(flip(u), flip(f), flip(Bm), flip(Cm), d_skip=d_skip, z=flip(z), h0=h0,
                             backend=backend)
        assert_close(out, flip(flipped), torch.float32, backend=backend, what=f"reverse ({backend})")


# ---------------------------------------------------------------- torch.compile -----------
@pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
def test_compiles_without_graph_breaks():
    """The Triton path is a custom op: torch.compile(fullgraph=True) traces it, and the compiled
    graph computes what eager does, gradients included."""
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in scan_inputs((2, 3, 7), 5, 3, seed=5)[:6]]

    def fn(u, f, Bm, Cm, d_skip, z):
        return scan_2d(gated_scan_2d, u, f, Bm, Cm, "col_reverse", d_skip=d_skip, z=z, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out, out = fn(*inputs), compiled(*inputs)
    assert torch.equal(out, eager_out)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), inputs)
    for got, want in zip(torch.autograd.grad(out.square().sum(), inputs), eager_grads):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- benchmark ---------------
def test_benchmark_baseline_and_quick_run(tmp_path, monkeypatch):
    """``--quick`` writes the benchmark's table (its sequential baseline is the oracle
    ``naive.gated_scan``)."""
    from moe_restore.benchmarks import scan as bench

    monkeypatch.setenv("MOE_RESTORE_RESULTS_DIR", str(tmp_path))
    assert bench.main(["--quick"]) == 0
    (path,) = tmp_path.glob("scan-*.json")
    rows = json.loads(path.read_text())["rows"]
    expected = {"triton", "torch", "loop"} if DEVICE.type == "cuda" else {"torch", "loop"}
    assert expected <= {r["implementation"] for r in rows}
    assert all(r["saved_bytes_per_token"] > 0 for r in rows)
    # Without a GPU a Triton row (interpreter) carries saved bytes only.
    timed = [r for r in rows if r["implementation"] != "triton" or DEVICE.type == "cuda"]
    assert timed and all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in timed)


# ---------------------------------------------------------------- errors ------------------
def test_errors_name_the_argument():
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 6), 4, 3)
    with pytest.raises(ValueError, match="f must have shape"):
        gated_scan(u, f[:, :5], Bm, Cm)
    with pytest.raises(ValueError, match="Cm must have shape"):
        gated_scan(u, f, Bm, Cm[..., :2])
    with pytest.raises(ValueError, match="Bm must have shape"):
        gated_scan(u, f, Bm[:, :4], Cm[:, :4])
    with pytest.raises(ValueError, match="Bm must have shape"):  # a wrong Bm alone is blamed on Bm
        gated_scan(u, f, Bm[:, :4], Cm)
    with pytest.raises(ValueError, match="u must have shape"):
        gated_scan(u[0], f[0], Bm[0], Cm[0])
    with pytest.raises(ValueError, match="d_skip must have shape"):
        gated_scan(u, f, Bm, Cm, d_skip=d_skip[:3])
    with pytest.raises(ValueError, match="h0 must have shape"):
        gated_scan(u, f, Bm, Cm, h0=h0[:, :, :2])
    with pytest.raises(ValueError, match="z must have shape"):
        gated_scan(u, f, Bm, Cm, z=z[:1])
    with pytest.raises(TypeError, match="f must have u's dtype"):
        gated_scan(u, f.half(), Bm, Cm)
    with pytest.raises(TypeError, match="u must be a floating-point"):
        gated_scan(u.long(), f, Bm, Cm)
    with pytest.raises(TypeError, match="Bm must be a torch.Tensor"):
        gated_scan(u, f, Bm.tolist(), Cm)
    with pytest.raises(ValueError, match="one device"):
        gated_scan(u, f.to("meta"), Bm, Cm)
    with pytest.raises(ValueError, match="u must have D >= 1"):
        gated_scan(u[..., :0], f[..., :0], Bm, Cm, d_skip=d_skip[:0])
    with pytest.raises(TypeError, match="reverse must be a bool"):
        gated_scan(u, f, Bm, Cm, reverse=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_scan(u, f, Bm, Cm, backend="cuda")
    grid = lambda t: t.view(2, 2, 3, -1)  # noqa: E731
    with pytest.raises(ValueError, match="order must be one of"):
        gated_scan_2d(grid(u), grid(f), grid(Bm), grid(Cm), order="diagonal")
    with pytest.raises(ValueError, match="u must have shape"):
        gated_scan_2d(u, f, Bm, Cm)


@pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
def test_triton_limits_are_explicit():
    u, f, Bm, Cm, *_ = scan_inputs((1, 4), 3, 65)
    with pytest.raises(ValueError, match="N <= 64"):
        gated_scan(u, f, Bm, Cm, backend="triton")
    u, f, Bm, Cm, *_ = scan_inputs((1, 4), 3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        gated_scan(u, f, Bm, Cm, backend="triton")

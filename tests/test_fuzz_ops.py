"""Fuzz of the public ops over dtypes, shapes, strides (non-contiguous views), non-finite values
and routing skew, on every backend here: each example either raises a clean TypeError/ValueError
that the float64 reference predicts, or returns the reference's result (non-finite exactly where
it is non-finite, within the dtype's tolerance elsewhere). Derandomized: CI runs the same examples."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moe_restore.kernels import gated_scan, moe_mlp, topk_route
from test_gated_scan import reference_scan
from test_moe_mlp import oracle_moe_mlp
from test_routing_underflow import oracle
from utils import DEVICE, assert_close, backends, raising_backends

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure costs no more time
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRITON_BF16 = DEVICE.type == "cuda"  # the interpreter's bf16 tl.dot is wrong


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a contiguous, transposed-storage or strided (every other
    column of a wider buffer) view."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, backend: str, what: str) -> None:
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out).cpu(), finite), f"{what}: non-finite where the reference is not"
    if finite.any():
        assert_close(out.cpu()[finite], ref[finite], dtype, backend=backend, what=what)


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])


@pytest.mark.parametrize("backend", backends())
@FUZZ
@given(T=st.integers(1, 12), E=st.integers(1, 9), k=st.integers(1, 10), dtype=DTYPES, layout=LAYOUTS,
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(),
       scale=st.sampled_from([1.0, 30.0, 1e4]), skew=st.sampled_from([0.0, 50.0]),
       special=st.sampled_from(["none", "nan", "-inf row", "+inf", "-inf entries"]), seed=st.integers(0, 2**16))
def test_fuzz_topk_route(backend, T, E, k, dtype, layout, scoring, renormalize, scale, skew, special, seed):
    g = torch.Generator().manual_seed(seed)
    logits = randn(g, T, E, scale=scale)
    logits[:, 0] += skew  # routing skew: most tokens to expert 0
    row = seed % T
    if special == "nan":
        logits[row, seed % E] = torch.nan
    elif special == "-inf row":
        logits[row] = -torch.inf
    elif special == "+inf":
        logits[row, seed % E] = torch.inf
    elif special == "-inf entries":
        logits[:, seed % E] = -torch.inf
    logits = laid_out(logits.to(dtype).to(DEVICE), layout)
    rounded = logits.float().double().cpu()
    if k > E:
        with pytest.raises(ValueError, match="k must be <="):
            topk_route(logits, k, scoring=scoring, renormalize=renormalize, backend=backend)
        return
    refused = (rounded.isnan().any(1) | (rounded.amax(1) == -torch.inf)
               | ((rounded == torch.inf).any(1) if scoring == "softmax" else False))
    if refused.any():
        if backend not in raising_backends():  # a device-side assert on a GPU: test_device_checks
            return
        # The torch backend counts the refused tokens; the Triton path's device-side check cannot.
        message = f"{int(refused.sum())} token" if backend == "torch" else "refusing to route"
        with pytest.raises(ValueError, match=message):
            topk_route(logits, k, scoring=scoring, renormalize=renormalize, backend=backend)
        return
    r = topk_route(logits, k, scoring=scoring, renormalize=renormalize, backend=backend)
    weights, experts = oracle(rounded, k, scoring, renormalize)
    assert torch.equal(r.experts.cpu(), experts)
    assert torch.equal(r.expert_counts().cpu(), torch.bincount(experts.flatten(), minlength=E))
    assert_close(r.weights, weights, torch.float32, backend=backend, what="weights")


@pytest.mark.parametrize("backend", backends())
@FUZZ
@given(T=st.integers(1, 9), D=st.integers(1, 10), H=st.integers(1, 10), D_out=st.integers(1, 8),
       E=st.integers(1, 4), k=st.integers(1, 4), dtype=DTYPES, layout=LAYOUTS,
       activation=st.sampled_from(["gelu", "gelu_tanh", "silu", "swiglu", "relu"]), bias=st.booleans(),
       skew=st.sampled_from([0.0, 50.0]), nan_row=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_moe_mlp(backend, T, D, H, D_out, E, k, dtype, layout, activation, bias, skew, nan_row, seed):
    if dtype == torch.bfloat16 and backend == "triton" and not TRITON_BF16:
        dtype = torch.float16
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    cols = 2 * H if activation == "swiglu" else H
    logits = randn(g, T, E)
    logits[:, -1] += skew
    x = randn(g, T, D)
    if nan_row:
        x[seed % T, seed % D] = torch.nan
    w1, w2 = randn(g, E, D, cols, scale=D**-0.5), randn(g, E, H, D_out, scale=H**-0.5)
    b1, b2 = (randn(g, E, cols, scale=0.5), randn(g, E, D_out, scale=0.5)) if bias else (None, None)
    cast = lambda t: None if t is None else laid_out(t.to(dtype).to(DEVICE), layout)  # noqa: E731
    routing = topk_route(logits.float().to(DEVICE), k, backend=backend)
    args = (cast(x), routing, cast(w1), cast(w2), cast(b1), cast(b2))
    if dtype == torch.float64 and backend == "triton":
        with pytest.raises(TypeError, match="x is float64"):
            moe_mlp(*args, activation=activation, backend=backend)
        return
    y = moe_mlp(*args, activation=activation, backend=backend)
    as64 = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref = oracle_moe_mlp(as64(x), routing.experts.cpu(), routing.weights.double().cpu(), as64(w1), as64(w2),
                         as64(b1), as64(b2), activation)
    assert y.dtype == dtype
    assert_matches(y, ref, dtype, backend, "moe_mlp output")


@pytest.mark.parametrize("backend", backends())
@settings(FUZZ, max_examples=8)  # the interpreted scan is the slowest op here
@given(B=st.integers(1, 2), L=st.integers(1, 20), D=st.integers(1, 5), N=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]), layout=LAYOUTS,
       reverse=st.booleans(), extras=st.booleans(), decay_scale=st.sampled_from([2.0, 40.0]),
       special=st.sampled_from(["none", "nan u", "nan f", "decay 0", "decay 1"]), seed=st.integers(0, 2**16))
def test_fuzz_gated_scan(backend, B, L, D, N, dtype, layout, reverse, extras, decay_scale, special, seed):
    g = torch.Generator().manual_seed(seed)
    u, f, bm, cm = randn(g, B, L, D), randn(g, B, L, D, scale=decay_scale), randn(g, B, L, N), randn(g, B, L, N)
    d_skip, z, h0 = (randn(g, D), randn(g, B, L, D), randn(g, B, D, N)) if extras else (None, None, None)
    t, d = seed % L, seed % D
    if special == "nan u":
        u[0, t, d] = torch.nan
    elif special == "nan f":
        f[-1, t, d] = torch.nan
    elif special == "decay 0":
        f[0, t] = -torch.inf
    elif special == "decay 1":
        f[-1, t:, d] = torch.inf
    cast = lambda v: None if v is None else laid_out(v.to(dtype).to(DEVICE), layout)  # noqa: E731
    args = [cast(v) for v in (u, f, bm, cm)]
    kwargs = dict(d_skip=None if d_skip is None else d_skip.float().to(DEVICE), z=cast(z),
                  h0=None if h0 is None else h0.float().to(DEVICE), reverse=reverse, return_final_state=True)
    if dtype == torch.float64 and backend == "triton":
        with pytest.raises(TypeError, match="u is float64"):
            gated_scan(*args, **kwargs, backend=backend)
        return
    out, h_final = gated_scan(*args, **kwargs, backend=backend)
    as64 = lambda v: None if v is None else v.to(dtype).double()  # noqa: E731
    ref_out, ref_final = reference_scan(*(as64(v) for v in (u, f, bm, cm)),
                                        None if d_skip is None else d_skip.float().double(), as64(z),
                                        None if h0 is None else h0.float().double(), reverse)
    assert out.dtype == dtype
    assert_matches(out, ref_out, dtype, backend, "scan output")
    assert_matches(h_final, ref_final, dtype, backend, "final state")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_nan_in_x_reaches_its_token_only(backend, activation):
    """Non-finite input rows: NaN exactly in the outputs of the tokens that hold one (relu too:
    max(NaN, 0) must not turn it into 0)."""
    g = torch.Generator().manual_seed(3)
    T, D, H, E = 6, 5, 7, 3
    cols = 2 * H if activation == "swiglu" else H
    x, w1, w2 = randn(g, T, D).float(), randn(g, E, D, cols).float(), randn(g, E, H, 4).float()
    x[2] = torch.nan
    x[4, 1] = torch.nan
    routing = topk_route(randn(g, T, E).float().to(DEVICE), 2, backend=backend)
    y = moe_mlp(x.to(DEVICE), routing, w1.to(DEVICE), w2.to(DEVICE), activation=activation, backend=backend)
    ref = oracle_moe_mlp(x.double(), routing.experts.cpu(), routing.weights.double().cpu(), w1.double(),
                         w2.double(), None, None, activation)
    assert ref[[2, 4]].isnan().all()
    assert_matches(y, ref, torch.float32, backend, "moe_mlp output")

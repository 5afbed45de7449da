"""Fuzz of the public ops over dtypes, shapes (empty ones included), strides (non-contiguous
views), devices (an argument on another device), non-finite values and routing skew, on every
backend here: each example either raises a clean TypeError/ValueError that the float64 reference
predicts, or returns the reference's result (non-finite exactly where it is non-finite, within the
dtype's tolerance elsewhere). Derandomized: CI runs the same examples."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moe_restore.kernels import gated_scan, moe_mlp, naive, nested_route, routing_from_topk, topk_route
from utils import DEVICE, assert_close, backends, raising_backends

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure costs no more time
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRITON_BF16 = DEVICE.type == "cuda"  # the interpreter's bf16 tl.dot is wrong: moe_mlp refuses it there
OTHER_DEVICE = "cpu" if DEVICE.type == "cuda" else "meta"  # where a misplaced argument goes


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
@given(T=st.integers(0, 12), E=st.integers(1, 9), k=st.integers(1, 10), dtype=DTYPES, layout=LAYOUTS,
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(),
       scale=st.sampled_from([1.0, 30.0, 1e4]), skew=st.sampled_from([0.0, 50.0]),
       special=st.sampled_from(["none", "nan", "-inf row", "+inf", "-inf entries"]), seed=st.integers(0, 2**16))
def test_fuzz_topk_route(backend, T, E, k, dtype, layout, scoring, renormalize, scale, skew, special, seed):
    g = torch.Generator().manual_seed(seed)
    logits = randn(g, T, E, scale=scale)
    logits[:, 0] += skew  # routing skew: most tokens to expert 0
    row = seed % max(T, 1)
    if T == 0:
        special = "none"
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
    if T == 0:
        assert r.weights.shape == r.experts.shape == (0, k) and r.expert_offsets.tolist() == [0] * (E + 1)
        return
    weights, experts = naive.topk_route(rounded, k, scoring=scoring, renormalize=renormalize)
    assert torch.equal(r.experts.cpu(), experts)
    assert torch.equal(r.expert_counts().cpu(), torch.bincount(experts.flatten(), minlength=E))
    assert_close(r.weights, weights, torch.float32, backend=backend, what="weights")


@pytest.mark.parametrize("backend", backends())
@FUZZ
@given(T=st.integers(0, 9), D=st.integers(1, 10), H=st.integers(1, 10), D_out=st.integers(1, 8),
       E=st.integers(1, 4), k=st.integers(1, 4), dtype=DTYPES, layout=LAYOUTS,
       activation=st.sampled_from(["gelu", "gelu_tanh", "silu", "swiglu", "relu"]), bias=st.booleans(),
       skew=st.sampled_from([0.0, 50.0]), nan_row=st.booleans(),
       misplaced=st.sampled_from([None, None, None, "w1", "w2", "b1", "b2"]), seed=st.integers(0, 2**16))
def test_fuzz_moe_mlp(backend, T, D, H, D_out, E, k, dtype, layout, activation, bias, skew, nan_row, misplaced,
                      seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    cols = 2 * H if activation == "swiglu" else H
    logits = randn(g, T, E)
    logits[:, -1] += skew
    x = randn(g, T, D)
    if nan_row and T:
        x[seed % T, seed % D] = torch.nan
    w1, w2 = randn(g, E, D, cols, scale=D**-0.5), randn(g, E, H, D_out, scale=H**-0.5)
    b1, b2 = (randn(g, E, cols, scale=0.5), randn(g, E, D_out, scale=0.5)) if bias else (None, None)
    cast = lambda t: None if t is None else laid_out(t.to(dtype).to(DEVICE), layout)  # noqa: E731
    routing = topk_route(logits.float().to(DEVICE), k, backend=backend)
    args = dict(x=cast(x), routing=routing, w1=cast(w1), w2=cast(w2), b1=cast(b1), b2=cast(b2))
    if misplaced is not None and args[misplaced] is not None:
        args[misplaced] = args[misplaced].to(OTHER_DEVICE)
        with pytest.raises(ValueError, match=f"one device, got .*{misplaced} on {OTHER_DEVICE}"):
            moe_mlp(**args, activation=activation, backend=backend)
        return
    if backend == "triton" and (dtype == torch.float64 or dtype == torch.bfloat16 and not TRITON_BF16):
        with pytest.raises(TypeError, match=f"x is {str(dtype).split('.')[1]}"):
            moe_mlp(**args, activation=activation, backend=backend)
        return
    y = moe_mlp(**args, activation=activation, backend=backend)
    if T == 0:
        assert y.shape == (0, D_out) and y.dtype == dtype
        return
    as64 = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
    ref = naive.moe_mlp(as64(x), routing.weights.cpu(), routing.experts.cpu(), as64(w1), as64(w2), as64(b1), as64(b2),
                        activation=activation)
    assert y.dtype == dtype
    assert_matches(y, ref, dtype, backend, "moe_mlp output")


@pytest.mark.parametrize("backend", backends())
@settings(FUZZ, max_examples=8)  # the interpreted scan is the slowest op here
@given(B=st.integers(1, 2), L=st.integers(0, 20), D=st.integers(1, 5), N=st.integers(1, 4), dtype=DTYPES,
       layout=LAYOUTS, reverse=st.booleans(), extras=st.booleans(), decay_scale=st.sampled_from([2.0, 40.0]),
       special=st.sampled_from(["none", "nan u", "nan f", "decay 0", "decay 1", "misplaced Cm", "misplaced z"]),
       seed=st.integers(0, 2**16))
def test_fuzz_gated_scan(backend, B, L, D, N, dtype, layout, reverse, extras, decay_scale, special, seed):
    g = torch.Generator().manual_seed(seed)
    u, f, bm, cm = randn(g, B, L, D), randn(g, B, L, D, scale=decay_scale), randn(g, B, L, N), randn(g, B, L, N)
    d_skip, z, h0 = (randn(g, D), randn(g, B, L, D), randn(g, B, D, N)) if extras else (None, None, None)
    if L == 0 and special.startswith(("nan", "decay")):
        special = "none"
    t, d = seed % max(L, 1), seed % D
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
    if special.startswith("misplaced") and (special == "misplaced Cm" or z is not None):
        name = special.split()[1]
        if name == "Cm":
            args[3] = args[3].to(OTHER_DEVICE)
        else:
            kwargs["z"] = kwargs["z"].to(OTHER_DEVICE)
        with pytest.raises(ValueError, match=f"one device, got .*{name} on {OTHER_DEVICE}"):
            gated_scan(*args, **kwargs, backend=backend)
        return
    if dtype == torch.float64 and backend == "triton":
        with pytest.raises(TypeError, match="u is float64"):
            gated_scan(*args, **kwargs, backend=backend)
        return
    out, h_final = gated_scan(*args, **kwargs, backend=backend)
    if L == 0:  # nothing scanned: the final state is h0 (or 0)
        assert out.shape == (B, 0, D) and out.dtype == dtype
        assert torch.equal(h_final.cpu(), torch.zeros(B, D, N) if h0 is None else h0.float())
        return
    as64 = lambda v: None if v is None else v.to(dtype).double()  # noqa: E731
    ref_out, ref_final = naive.gated_scan(*(as64(v) for v in (u, f, bm, cm)),
                                          d_skip=None if d_skip is None else d_skip.float(), z=as64(z),
                                          h0=None if h0 is None else h0.float(), reverse=reverse)
    assert out.dtype == dtype
    assert_matches(out, ref_out, dtype, backend, "scan output")
    assert_matches(h_final, ref_final, dtype, backend, "final state")


@pytest.mark.parametrize("backend", backends())
@FUZZ
@given(T=st.integers(0, 8), G=st.integers(1, 4), E=st.integers(1, 4), k_g=st.integers(1, 4), k_e=st.integers(1, 4),
       dtype=DTYPES, layout=LAYOUTS, flat=st.booleans(), renormalize=st.booleans(), misplaced=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_nested_route(backend, T, G, E, k_g, k_e, dtype, layout, flat, renormalize, misplaced, seed):
    """Group and expert logits of any float dtype, layout and T (0 too), [T, G, E] or flat [T, G*E]."""
    k_g, k_e = min(k_g, G), min(k_e, E)
    g = torch.Generator().manual_seed(seed)
    group_logits = laid_out(randn(g, T, G, scale=3.0).to(dtype).to(DEVICE), layout)
    expert_logits = laid_out(randn(g, T, G * E if flat else G, *(() if flat else (E,)), scale=3.0).to(dtype)
                             .to(DEVICE), layout)
    if misplaced:
        with pytest.raises(ValueError, match=f"one device, got .*expert_logits on {OTHER_DEVICE}"):
            nested_route(group_logits, expert_logits.to(OTHER_DEVICE), k_g, k_e, backend=backend)
        return
    r = nested_route(group_logits, expert_logits, k_g, k_e, renormalize=renormalize, backend=backend)
    assert r.experts.shape == r.weights.shape == (T, k_g * k_e) and r.num_experts == G * E
    assert torch.equal(r.expert_counts().cpu(), torch.bincount(r.experts.flatten().cpu(), minlength=G * E))
    if T == 0:
        return
    rounded = lambda t: t.float().double().cpu()  # noqa: E731
    weights, experts, group_weights, groups = naive.nested_route(rounded(group_logits),
                                                                 rounded(expert_logits).reshape(T, G, E), k_g, k_e,
                                                                 renormalize=renormalize)
    assert torch.equal(r.experts.cpu(), experts) and torch.equal(r.groups.cpu(), groups)
    assert_close(r.weights, weights, torch.float32, backend=backend, what="weights")
    assert_close(r.group_weights, group_weights, torch.float32, backend=backend, what="group weights")


@pytest.mark.parametrize("backend", backends())
@FUZZ
@given(T=st.integers(0, 10), E=st.integers(1, 8), k=st.integers(1, 8), dtype=DTYPES, layout=LAYOUTS,
       index_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16]), seed=st.integers(0, 2**16))
def test_fuzz_routing_from_topk(backend, T, E, k, dtype, layout, index_dtype, seed):
    """Choices made elsewhere: any integer dtype and layout of experts, any float weights; the
    dispatch layout lists the assignments expert by expert, and the weights are kept in float32."""
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    experts = laid_out(experts.to(index_dtype).to(DEVICE), layout)
    weights = laid_out(randn(g, T, k).to(dtype).to(DEVICE), layout)
    r = routing_from_topk(experts, weights, E, backend=backend)
    assert torch.equal(r.experts.cpu(), experts.long().cpu()) and r.weights.dtype == torch.float32
    assert torch.equal(r.weights.cpu(), weights.float().cpu())
    order, offsets = naive.dispatch(experts.cpu(), E)
    assert r.sorted_assignments.tolist() == order and r.expert_offsets.tolist() == offsets


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
    ref = naive.moe_mlp(x, routing.weights.cpu(), routing.experts.cpu(), w1, w2, activation=activation)
    assert ref[[2, 4]].isnan().all()
    assert_matches(y, ref, torch.float32, backend, "moe_mlp output")

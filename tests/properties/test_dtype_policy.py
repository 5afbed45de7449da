"""The dtype policy of the public ops (docs/kernels.md): each dtype is computed right on both
backends or refused with a TypeError naming the argument, and backend=None never picks a path
that is wrong for the dtype."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import gated_scan, gated_scan_2d, moe_mlp, naive, nested_route, routing_from_topk, topk_route
from moe_restore.layers import TopKMoE
from moe_layer_oracle import TOKENS, float64_params, oracle_topk_moe
from utils import DEVICE, assert_close, backends

TRITON_HERE = "triton" in backends()


def mlp_problem(dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    T, D, H, E, D_out = 23, 12, 20, 4, 9
    routing = topk_route(rand(T, E) * 2, 2, backend="torch")
    return rand(T, D), routing, rand(E, D, H) / D**0.5, rand(E, H, D_out) / H**0.5, \
        (rand(E, H) if bias else None), (rand(E, D_out) if bias else None)


def test_moe_mlp_float64_with_backend_none_is_float64_exact():
    """float64 goes to the torch backend, whose arithmetic (combine included) is float64."""
    x, r, w1, w2, b1, b2 = mlp_problem(torch.float64)
    y = moe_mlp(x, r, w1, w2, b1, b2)
    ref = naive.moe_mlp(*(t.cpu() for t in (x, r.weights, r.experts, w1, w2, b1, b2)), activation="gelu")
    assert y.dtype == torch.float64
    assert_close(y, ref, torch.float64, what="float64 output")


@pytest.mark.skipif(not TRITON_HERE, reason="the Triton backend cannot run here")
def test_moe_mlp_float64_on_triton_is_refused():
    x, r, w1, w2, b1, b2 = mlp_problem(torch.float64)
    with pytest.raises(TypeError, match="x is float64"):
        moe_mlp(x, r, w1, w2, b1, b2, backend="triton")


@pytest.mark.skipif(not TRITON_HERE or DEVICE.type != "cpu", reason="the Triton interpreter is not in use")
def test_moe_mlp_bfloat16_under_the_interpreter_takes_torch_or_is_refused():
    """The interpreter's bfloat16 tl.dot is wrong: None takes the torch backend (right within the
    bf16 tolerance of the oracle), "triton" is refused; float16 stays on Triton and is right."""
    x, r, w1, w2, b1, b2 = mlp_problem(torch.bfloat16)
    ref = naive.moe_mlp(x, r.weights, r.experts, w1, w2, b1, b2, activation="gelu")
    assert_close(moe_mlp(x, r, w1, w2, b1, b2), ref, torch.bfloat16, what="bf16 output, backend None")
    with pytest.raises(TypeError, match="x is bfloat16"):
        moe_mlp(x, r, w1, w2, b1, b2, backend="triton")
    half = [t.half() for t in (x, w1, w2, b1, b2)]
    ref = naive.moe_mlp(half[0], r.weights, r.experts, *half[1:], activation="gelu")
    assert_close(moe_mlp(half[0], r, *half[1:], backend="triton"), ref, torch.float16, backend="triton",
                 what="fp16 output on Triton")


def test_float64_topk_moe_with_backend_none_matches_the_oracle():
    """A float64 TopKMoE (backend=None) against the float64 per-token loop; the routing weights
    are float32 by the policy, hence the float32 tolerance (a wrong path is off by O(1))."""
    torch.manual_seed(0)
    layer = TopKMoE(12, 20, 5, 2).to(DEVICE).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64, device=DEVICE)
    y64 = oracle_topk_moe(layer, float64_params(layer), TOKENS[0](x.cpu()))[0]
    y = layer(x)
    assert y.dtype == torch.float64
    assert_close(TOKENS[0](y), y64, torch.float32, what="float64 layer output")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", ["b1", "b2"])
def test_bias_dtype_and_shape_are_checked_like_the_weights(backend, name):
    x, r, w1, w2, b1, b2 = mlp_problem(torch.float32)
    biases = {"b1": b1, "b2": b2}
    wrong_dtype = dict(biases, **{name: biases[name].half()})
    with pytest.raises(TypeError, match=f"{name} must have the dtype of x"):
        moe_mlp(x, r, w1, w2, **wrong_dtype, backend=backend)
    wrong_rank = dict(biases, **{name: biases[name][0]})
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        moe_mlp(x, r, w1, w2, **wrong_rank, backend=backend)
    with pytest.raises(TypeError, match=f"{name} must be a floating"):
        moe_mlp(x, r, w1, w2, **dict(biases, **{name: biases[name].long()}), backend=backend)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_routing_ops_take_every_float_dtype_and_compute_in_float32(backend, dtype):
    """Logits of any float dtype are rounded to float32 and routed there, the same on both backends."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(17, 6, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    r = topk_route(logits, 2, backend=backend)
    ref = topk_route(logits.float(), 2, backend="torch")
    assert torch.equal(r.experts, ref.experts) and r.weights.dtype == torch.float32
    assert_close(r.weights, ref.weights, torch.float32, what="weights")
    n = nested_route(logits[:, :2], logits.view(17, 2, 3), 1, 2, backend=backend)
    n_ref = nested_route(logits[:, :2].float(), logits.view(17, 2, 3).float(), 1, 2, backend="torch")
    assert torch.equal(n.experts, n_ref.experts)
    assert_close(n.weights, n_ref.weights, torch.float32, what="nested weights")
    f = routing_from_topk(r.experts, r.weights.to(dtype), 6, backend=backend)
    assert f.weights.dtype == torch.float32 and torch.equal(f.sorted_assignments, r.sorted_assignments)


def test_scans_send_float64_to_torch_and_refuse_it_on_triton():
    u = torch.randn(1, 6, 3, dtype=torch.float64, device=DEVICE)
    bm = torch.randn(1, 6, 2, dtype=torch.float64, device=DEVICE)
    assert gated_scan(u, u, bm, bm).dtype == torch.float64
    grid = lambda t: t.view(1, 2, 3, -1)  # noqa: E731
    assert gated_scan_2d(grid(u), grid(u), grid(bm), grid(bm)).dtype == torch.float64
    if TRITON_HERE:
        with pytest.raises(TypeError, match="u is float64"):
            gated_scan(u, u, bm, bm, backend="triton")
        with pytest.raises(TypeError, match="u is float64"):
            gated_scan_2d(grid(u), grid(u), grid(bm), grid(bm), backend="triton")

"""topk_route against the float64 oracle ``naive.topk_route``, on every backend runnable here."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_restore.kernels import Routing, naive, nested_route, routing_from_topk, topk_route
from utils import DEVICE, assert_close, backends, poisoned_allocations, raising_backends


def check_dispatch_invariants(r: Routing) -> None:
    T, k = r.experts.shape
    offsets = r.expert_offsets.cpu()
    assert offsets.dtype == torch.int64 and r.sorted_assignments.dtype == torch.int64
    assert offsets[0] == 0 and offsets[-1] == T * k
    assert (offsets.diff() >= 0).all(), "offsets must be monotone"
    order = r.sorted_assignments.cpu()
    assert torch.equal(order.sort().values, torch.arange(T * k)), "not a permutation of the assignments"
    flat = r.experts.reshape(-1).cpu()
    for e in range(r.num_experts):
        segment = order[offsets[e]:offsets[e + 1]]
        assert (flat[segment] == e).all(), f"segment of expert {e} holds other experts' assignments"
        assert (segment.diff() > 0).all(), f"segment of expert {e} is not in assignment order (stable)"
        assert offsets[e + 1] - offsets[e] == (flat == e).sum()


CASES = [  # T, E, k
    (1, 1, 1), (7, 5, 2), (7, 5, 5), (300, 8, 2), (300, 8, 8), (64, 130, 3), (33, 3, 1),
    (70, 40, 8),  # 64 padded experts: the backward's own token blocks (32, a partial one last)
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", CASES)
def test_topk_route_matches_oracle(backend, scoring, renormalize, T, E, k):
    gen = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    logits = (2 * torch.randn(T, E, generator=gen, dtype=torch.float64)).float().to(DEVICE).requires_grad_()
    with poisoned_allocations():
        r = topk_route(logits, k, scoring=scoring, renormalize=renormalize, backend=backend)
        want_w, want_e = naive.topk_route(logits.detach().cpu(), k, scoring=scoring, renormalize=renormalize)
        assert torch.equal(r.experts.cpu(), want_e)
        assert r.weights.dtype == torch.float32 and r.num_experts == E
        assert_close(r.weights, want_w, torch.float32, what="weights")
        check_dispatch_invariants(r)
        upstream = torch.randn(T, k, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad((r.weights * upstream.float().to(DEVICE)).sum(), logits)
    if k == 1 and renormalize:  # every weight is exactly 1: the gradient is identically zero
        assert grad.abs().max() <= 1e-6
        return
    ref_logits = logits.detach().cpu().double().requires_grad_()
    ref_w, _ = naive.topk_route(ref_logits, k, scoring=scoring, renormalize=renormalize)
    (want_grad,) = torch.autograd.grad((ref_w * upstream).sum(), ref_logits)
    assert_close(grad, want_grad, torch.float32, what="d logits")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_topk_route_other_logit_dtypes(backend, dtype):
    logits = torch.randn(50, 6, dtype=dtype, device=DEVICE, requires_grad=True)
    r = topk_route(logits, 2, backend=backend)
    want_w, want_e = naive.topk_route(logits.detach().cpu(), 2)
    assert torch.equal(r.experts.cpu(), want_e)
    assert_close(r.weights, want_w, torch.float32)
    (grad,) = torch.autograd.grad(r.weights[:, 0].sum(), logits)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", backends())
def test_ties_go_to_the_lower_index(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    r = topk_route(logits, 3, scoring="sigmoid", backend=backend)
    assert r.experts.tolist() == [[1, 2, 4], [0, 1, 2]]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_many_ties_match_the_oracle(backend, scoring):
    """Logits from three levels (as bf16 logits or saturated scores give): each backend's own
    stable top-k picks what the oracle's Python sort picks, and the weights agree."""
    logits = torch.randint(0, 3, (64, 9), generator=torch.Generator().manual_seed(4)).float().to(DEVICE)
    r = topk_route(logits, 4, scoring=scoring, backend=backend)
    want_w, want_e = naive.topk_route(logits.cpu(), 4, scoring=scoring)
    assert torch.equal(r.experts.cpu(), want_e)
    assert_close(r.weights, want_w, torch.float32, backend=backend, what="weights")


@pytest.mark.parametrize("backend", backends())
def test_unused_expert_and_single_expert_skew(backend):
    logits = torch.randn(40, 6, device=DEVICE)
    logits[:, 3] = -30.0  # never chosen
    logits[:, 5] = 30.0  # chosen by every token
    r = topk_route(logits, 2, backend=backend)
    counts = r.expert_counts().cpu()
    assert counts[3] == 0 and counts[5] == 40 and counts.sum() == 80
    check_dispatch_invariants(r)


@pytest.mark.parametrize("backend", raising_backends())
@pytest.mark.parametrize("bad", [math.nan, "all -inf"])
def test_nan_scores_raise(backend, bad):
    logits = torch.randn(9, 4, device=DEVICE)
    if bad == "all -inf":
        logits[4] = -math.inf
    else:
        logits[4, 2] = bad
    with pytest.raises(ValueError, match="NaN"):
        topk_route(logits, 2, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_empty_input(backend):
    logits = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    r = topk_route(logits, 2, backend=backend)
    assert r.weights.shape == (0, 2) and r.experts.shape == (0, 2)
    assert r.sorted_assignments.numel() == 0 and r.expert_offsets.tolist() == [0] * 6
    r.weights.sum().backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("call,error,match", [
    (lambda: topk_route(torch.randn(4, 3), 4), ValueError, "k must be <="),
    (lambda: topk_route(torch.randn(4, 3), 0), ValueError, "k must be >= 1"),
    (lambda: topk_route(torch.randn(4, 3), 1.5), TypeError, "k must be an int"),
    (lambda: topk_route(torch.ones(4, 3, dtype=torch.int64), 1), TypeError, "logits must be a floating"),
    (lambda: topk_route(torch.randn(12), 1), ValueError, r"logits must have shape \[T, E\]"),
    (lambda: topk_route(torch.randn(4, 3), 1, scoring="relu"), ValueError, "scoring must be"),
    (lambda: topk_route(torch.randn(4, 3), 1, backend="cuda"), ValueError, "backend must be"),
    (lambda: topk_route([[1.0]], 1), TypeError, "logits must be a torch.Tensor"),
    (lambda: topk_route(torch.randn(4, 3), 1, renormalize=0, backend="torch"), TypeError, "renormalize must be a bool"),
    (lambda: topk_route(torch.randn(4, 3), 1, renormalize="no"), TypeError, "renormalize must be a bool"),
    (lambda: nested_route(torch.randn(4, 2), torch.randn(4, 2, 3), 1, 1, renormalize=None), TypeError,
     "renormalize must be a bool"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), E=st.integers(1, 20), data=st.data())
def test_dispatch_invariants_hold_for_any_shape(T, E, data):
    k = data.draw(st.integers(1, E))
    scoring = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    seed = data.draw(st.integers(0, 2**16))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    for backend in backends():
        r = topk_route(logits, k, scoring=scoring, backend=backend)
        _, want_e = naive.topk_route(logits.cpu(), k, scoring=scoring)
        assert torch.equal(r.experts.cpu(), want_e)
        check_dispatch_invariants(r)


@pytest.mark.parametrize("backend", backends())
def test_routing_from_topk_layout_and_weight_gradient(backend):
    T, k, E = 7, 3, 5
    gen = torch.Generator().manual_seed(3)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEVICE, torch.int32)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    r = routing_from_topk(experts, weights, E, backend=backend)
    assert r.weights.dtype == torch.float32 and torch.equal(r.experts.cpu(), experts.long().cpu())
    # The dispatch layout of the oracle's loop: expert by expert, assignments a = t*k + j in increasing order.
    order, offsets = naive.dispatch(experts.cpu(), E)
    assert r.sorted_assignments.tolist() == order and r.expert_offsets.tolist() == offsets
    check_dispatch_invariants(r)
    probe = torch.arange(T * k, dtype=torch.float32, device=DEVICE).view(T, k)
    (r.weights * probe).sum().backward()
    assert torch.equal(weights.grad.cpu(), probe.double().cpu())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("bad", [-1, 5])
def test_routing_from_topk_out_of_range_raises(backend, bad):
    experts = torch.tensor([[0, 1], [2, bad]], device=DEVICE)
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        routing_from_topk(experts, torch.ones(2, 2, device=DEVICE), 5, backend=backend)


def test_routing_from_topk_with_repeats():
    """repeats=True (torch backend): a row may name an expert twice, each slot its own assignment
    in the layout of a hand loop; an id out of range is still refused, and the Triton dispatch,
    which ranks an expert once per token, is refused by name."""
    experts = torch.tensor([[2, 2, 0], [1, 2, 1], [0, 0, 0]], device=DEVICE)
    r = routing_from_topk(experts, torch.rand(3, 3, device=DEVICE), 4, backend="torch", repeats=True)
    assert (r.sorted_assignments.tolist(), r.expert_offsets.tolist()) == naive.dispatch(experts.cpu(), 4)
    assert r.expert_offsets.tolist() == [0, 4, 6, 9, 9]
    check_dispatch_invariants(r)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
            routing_from_topk(torch.tensor([[0, bad], [1, 1]], device=DEVICE), torch.ones(2, 2, device=DEVICE), 4,
                              backend="torch", repeats=True)
    if "triton" in backends():
        with pytest.raises(ValueError, match="torch backend"):
            routing_from_topk(experts, torch.rand(3, 3, device=DEVICE), 4, backend="triton", repeats=True)


@pytest.mark.parametrize("backend", backends())
def test_routing_from_topk_no_tokens(backend):
    weights = torch.zeros(0, 2, device=DEVICE, requires_grad=True)
    r = routing_from_topk(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), weights, 4, backend=backend)
    assert r.num_tokens == 0 and r.top_k == 2 and r.expert_offsets.tolist() == [0] * 5
    assert r.sorted_assignments.numel() == 0
    r.weights.sum().backward()
    assert weights.grad is not None and weights.grad.shape == (0, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda: routing_from_topk(torch.zeros(2, 2), torch.ones(2, 2), 4), TypeError, "experts"),
    (lambda: routing_from_topk(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 3), 4), ValueError, "weights"),
    (lambda: routing_from_topk(torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), 0), ValueError, "num_experts"),
])
def test_routing_from_topk_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""topk_route against a float64 oracle, on every backend runnable here."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_restore.kernels import Routing, topk_route
from utils import DEVICE, assert_close, backends, poisoned_allocations, raising_backends


def oracle_topk(logits: torch.Tensor, k: int, scoring: str, renormalize: bool):
    """Plain float64 routing: per token, pick the k largest scores, lower index first on ties."""
    p = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    weights, experts = [], []
    for t in range(p.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda e: (-p[t, e].item(), e))[:k]
        chosen = torch.stack([p[t, e] for e in order])
        weights.append(chosen / chosen.sum() if renormalize else chosen)
        experts.append(order)
    return torch.stack(weights), torch.tensor(experts, dtype=torch.int64)


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
        want_w, want_e = oracle_topk(logits.detach().cpu(), k, scoring, renormalize)
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
    ref_w, _ = oracle_topk(ref_logits, k, scoring, renormalize)
    (want_grad,) = torch.autograd.grad((ref_w * upstream).sum(), ref_logits)
    assert_close(grad, want_grad, torch.float32, what="d logits")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_topk_route_other_logit_dtypes(backend, dtype):
    logits = torch.randn(50, 6, dtype=dtype, device=DEVICE, requires_grad=True)
    r = topk_route(logits, 2, backend=backend)
    want_w, want_e = oracle_topk(logits.detach().cpu(), 2, "softmax", True)
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
        _, want_e = oracle_topk(logits.cpu(), k, scoring, True)
        assert torch.equal(r.experts.cpu(), want_e)
        check_dispatch_invariants(r)

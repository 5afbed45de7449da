"""Routing ranks by logits: no underflow of the scores changes which experts are chosen, and the
weights are computed stably (renormalised sigmoid weights in log space); rows with no usable
score are refused. Both backends, topk_route and nested_route, against the float64 oracle ``naive``
(which computes the weights in log space too)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import naive, nested_route, topk_route
from utils import DEVICE, assert_close, backends, raising_backends

INF = float("inf")


def huge_logits(T: int, E: int, seed: int) -> torch.Tensor:
    """Logits ~1e4 apart within a row: every score but the best underflows in float32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 1e4).to(DEVICE)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_underflowed_scores_do_not_change_the_choice(backend, scoring, renormalize):
    logits = huge_logits(45, 7, seed=3)
    logits[:, 5] = -1e4  # a sigmoid row with every score underflowed to 0
    logits[0] = torch.tensor([1e4, 0.0, 1e4 - 200, 5.0, 1e4 - 300, -1e4, 3.0])
    logits[1] = torch.tensor([-1e4, -1e4 + 1, -2e4, -1e4 + 2, -3e4, -1e4 + 0.5, -5e4])
    r = topk_route(logits, 3, scoring=scoring, renormalize=renormalize, backend=backend)
    weights, experts = naive.topk_route(logits.cpu(), 3, scoring=scoring, renormalize=renormalize)
    assert torch.equal(r.experts.cpu(), experts)
    assert r.experts[0].tolist() == [0, 2, 4] and r.experts[1].tolist() == [3, 1, 5]
    assert torch.equal(r.expert_counts().cpu(), torch.bincount(experts.flatten(), minlength=7))
    assert_close(r.weights, weights, torch.float32, what="weights")
    if renormalize:
        torch.testing.assert_close(r.weights.sum(1).cpu(), torch.ones(45), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gradients_in_the_underflow_region(backend, scoring):
    """Very negative sigmoid logits (every score underflows) still get the gradient of the
    weights they define; softmax logits ~1e2 apart likewise."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(20, 6, generator=g, dtype=torch.float64) * 3 - (1e3 if scoring == "sigmoid" else 0))
    logits = logits.to(DEVICE).requires_grad_()
    upstream = torch.randn(20, 2, generator=g, dtype=torch.float64).to(DEVICE)
    r = topk_route(logits, 2, scoring=scoring, backend=backend)
    grad, = torch.autograd.grad((r.weights.double() * upstream).sum(), logits)
    ref_logits = logits.detach().float().double().requires_grad_()  # what the op sees: float32 logits
    ref_w, _ = naive.topk_route(ref_logits, 2, scoring=scoring)
    ref_grad, = torch.autograd.grad((ref_w * upstream).sum(), ref_logits)
    assert ref_grad.abs().max() > 1e-3
    assert_close(grad, ref_grad, torch.float32, what="dlogits")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_rows_without_a_usable_score_are_refused(backend, scoring, renormalize):
    """A row whose best logit is -inf has every score exactly 0: refused for both scorings,
    like a NaN row; a row with some -inf logits but a finite best one is routed."""
    logits = torch.tensor([[0.5, -INF, 2.0, -INF], [-INF] * 4, [1.0, 0.0, -1.0, 3.0]], device=DEVICE)
    if backend in raising_backends():  # the Triton path's device-side check holds no count
        with pytest.raises(ValueError, match="1 token" if backend == "torch" else "refusing to route"):
            topk_route(logits, 2, scoring=scoring, renormalize=renormalize, backend=backend)
    r = topk_route(logits[[0, 2]], 3, scoring=scoring, renormalize=renormalize, backend=backend)
    weights, experts = naive.topk_route(logits[[0, 2]].cpu(), 3, scoring=scoring, renormalize=renormalize)
    assert torch.equal(r.experts.cpu(), experts) and r.experts[0].tolist() == [2, 0, 1]
    assert_close(r.weights, weights, torch.float32, what="weights")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("renormalize", [True, False])
def test_nested_routing_ranks_by_logits(backend, renormalize):
    g = torch.Generator().manual_seed(7)
    T, G, E = 30, 4, 5
    group_logits = (torch.randn(T, G, generator=g) * 1e4).to(DEVICE)
    expert_logits = (torch.randn(T, G, E, generator=g) * 1e4).to(DEVICE)
    r = nested_route(group_logits, expert_logits, 2, 3, renormalize=renormalize, backend=backend)
    weights, experts, q, groups = naive.nested_route(group_logits.cpu(), expert_logits.cpu(), 2, 3,
                                                     renormalize=renormalize)
    assert torch.equal(r.groups.cpu(), groups)
    assert_close(r.group_weights, q, torch.float32, what="group weights")
    assert torch.equal(r.experts.cpu(), experts)
    assert_close(r.weights, weights, torch.float32, what="weights")

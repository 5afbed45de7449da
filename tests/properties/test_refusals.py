"""A newcomer's mistakes end in a right answer or a one-line error naming the argument: double
backward (supported on the torch backend where its autograd is PyTorch's, NotImplementedError on
the Triton path), inputs whose dtype disagrees with a layer's parameters, meta tensors, and shapes
blamed on the right argument."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import gated_scan, moe_mlp, naive, nested_route, routing_from_topk, topk_route
from moe_restore.layers import TopKMoE
from utils import DEVICE, assert_close, backends


def _randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def _second_derivative(f, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d/d inputs of sum(grad(sum(f(inputs)^2))^2): a gradient of a gradient."""
    out = f(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    return list(torch.autograd.grad(sum(g.square().sum() for g in grads), inputs))


def test_double_backward_of_the_torch_scan_matches_the_oracle():
    inputs = [_randn(1, 7, 3, seed=0, dtype=torch.float64), _randn(1, 7, 3, seed=1, dtype=torch.float64),
              _randn(1, 7, 2, seed=2, dtype=torch.float64), _randn(1, 7, 2, seed=3, dtype=torch.float64)]
    got = _second_derivative(lambda *a: gated_scan(*a, backend="torch"),
                             [t.clone().requires_grad_() for t in inputs])
    want = _second_derivative(lambda *a: naive.gated_scan(*a)[0], [t.cpu().clone().requires_grad_() for t in inputs])
    for name, g, w in zip(("u", "f", "Bm", "Cm"), got, want):
        assert_close(g, w, torch.float64, what=f"second derivative w.r.t. {name}")


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_double_backward_of_the_torch_routing_matches_the_oracle(scoring):
    """The torch backend routes in float32 (the dtype policy): float32 tolerance against float64."""
    logits = _randn(6, 5, seed=4)
    got = _second_derivative(lambda l: topk_route(l, 2, scoring=scoring, backend="torch").weights,
                             [logits.clone().requires_grad_()])
    want = _second_derivative(lambda l: naive.topk_route(l, 2, scoring=scoring)[0],
                              [logits.double().cpu().requires_grad_()])
    assert_close(got[0], want[0], torch.float32, what="second derivative of the routing weights")


@pytest.mark.skipif("triton" not in backends(), reason="the Triton backend cannot run here")
@pytest.mark.parametrize("op", ["topk_route", "nested_route", "moe_mlp", "gated_scan"])
def test_double_backward_on_triton_is_a_clear_not_implemented_error(op):
    x = _randn(5, 4, seed=5).requires_grad_()
    calls = {
        "topk_route": lambda: topk_route(x, 2, backend="triton").weights,
        "nested_route": lambda: nested_route(x[:, :2], x, 1, 2, backend="triton").weights,
        "moe_mlp": lambda: moe_mlp(x, topk_route(x.detach(), 1, backend="triton"), _randn(4, 4, 6, seed=6),
                                   _randn(4, 6, 3, seed=7), backend="triton"),
        "gated_scan": lambda: gated_scan(x[None], x[None], x[None, :, :2], x[None, :, 2:], backend="triton"),
    }
    (grad,) = torch.autograd.grad(calls[op]().square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=f"{op} on backend='triton' has no second derivative"):
        grad.square().sum().backward()


def test_an_input_of_another_dtype_than_the_layer_is_named():
    layer = TopKMoE(6, 8, 3, 2, backend="torch")
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=f"x is {dtype} but the layer's parameters are torch.float32"):
            layer(torch.randn(4, 6, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them to one dtype: no refusal
        assert layer(torch.randn(4, 6)).dtype == torch.bfloat16


@pytest.mark.parametrize("op, name", [
    (lambda m: topk_route(torch.zeros(5, 3, device=m), 2), "logits"),
    (lambda m: nested_route(torch.zeros(5, 2, device=m), torch.zeros(5, 2, 3, device=m), 1, 1), "group_logits"),
    (lambda m: routing_from_topk(torch.zeros(5, 1, dtype=torch.int64, device=m), torch.ones(5, 1, device=m), 2),
     "experts"),
    (lambda m: moe_mlp(torch.zeros(5, 4, device=m), topk_route(torch.zeros(5, 2), 1), torch.zeros(2, 4, 8, device=m),
                       torch.zeros(2, 8, 4, device=m)), "x"),
    (lambda m: gated_scan(*[torch.zeros(1, 6, 3, device=m)] * 2, *[torch.zeros(1, 6, 2, device=m)] * 2), "u"),
    (lambda m: TopKMoE(6, 8, 3, 2).to(m)(torch.zeros(4, 6, device=m)), "logits"),
])
def test_meta_tensors_are_refused_naming_the_argument(op, name):
    with pytest.raises(ValueError, match=f"^{name} is on the meta device"):
        op("meta")

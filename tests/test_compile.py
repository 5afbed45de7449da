"""torch.compile(fullgraph=True) traces the ops without graph breaks (their Triton paths are
custom ops with fake implementations), and the compiled graph computes what eager does."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import moe_mlp, nested_route, topk_route
from utils import DEVICE, backends

pytestmark = pytest.mark.skipif("triton" not in backends(), reason="needs the Triton path")


def _compiled_matches_eager(fn, *inputs):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out = fn(*inputs)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), inputs)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert torch.equal(out, eager_out)
    for got, want in zip(grads, eager_grads):
        assert torch.equal(got, want)


def test_topk_moe_compiles_without_graph_breaks():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(40, 16, generator=gen), torch.randn(40, 4, generator=gen)
    w1, w2, b1 = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 32, 16, generator=gen), torch.randn(4, 32, generator=gen)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, logits, w1, w2, b1)]
    _compiled_matches_eager(lambda x, l, w1, w2, b1: moe_mlp(x, topk_route(l, 2), w1, w2, b1), *inputs)


def test_nested_moe_compiles_without_graph_breaks():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x, gl, el = torch.randn(30, 16, generator=gen), torch.randn(30, 3, generator=gen), torch.randn(30, 3, 2, generator=gen)
    w1, w2 = torch.randn(6, 16, 24, generator=gen), torch.randn(6, 24, 16, generator=gen)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, gl, el, w1, w2)]
    _compiled_matches_eager(lambda x, gl, el, w1, w2: moe_mlp(x, nested_route(gl, el, 2, 2), w1, w2), *inputs)


def test_nan_check_survives_compilation():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, l, w1, w2: moe_mlp(x, topk_route(l, 1), w1, w2), fullgraph=True,
                             backend="aot_eager")
    x, w1, w2 = torch.randn(8, 16), torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    logits = torch.randn(8, 2)
    compiled(x, logits, w1, w2)
    logits[3, 1] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        compiled(x, logits, w1, w2)

"""torch.compile(fullgraph=True) traces the ops without graph breaks on both backends (the Triton
path and the torch backend's grouped GEMMs are custom ops with fake implementations, and the
routing metadata has static sizes), and the compiled graph computes what eager does."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import moe_mlp, nested_route, topk_route
from moe_restore.kernels.activations import first_layer_width
from utils import DEVICE, backends, skip_if_compiled_torch_backward_is_wrong


def _compiled_matches_eager(fn, *inputs):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out = fn(*inputs)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), inputs)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert torch.equal(out, eager_out)
    for got, want in zip(grads, eager_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", backends())
def test_topk_moe_compiles_without_graph_breaks(backend):
    skip_if_compiled_torch_backward_is_wrong(backend)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(40, 16, generator=gen), torch.randn(40, 4, generator=gen)
    w1, w2, b1 = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 32, 16, generator=gen), torch.randn(4, 32, generator=gen)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, logits, w1, w2, b1)]
    _compiled_matches_eager(lambda x, l, w1, w2, b1: moe_mlp(x, topk_route(l, 2, backend=backend), w1, w2, b1,
                                                                        backend=backend), *inputs)


@pytest.mark.skipif("triton" not in backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kept_hidden_compiles_without_graph_breaks(monkeypatch, dtype):
    """The grouped path with the pre-activation kept (the custom op's second output, saved for
    backward; swiglu keeps it in float16, recomputes it in float32): traced through its fake
    implementation, the same values as eager."""
    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "grouped")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x, logits = torch.randn(40, 16, generator=gen), torch.randn(40, 4, generator=gen)
    w1, w2, b1 = torch.randn(4, 16, 64, generator=gen), torch.randn(4, 32, 16, generator=gen), torch.randn(4, 64, generator=gen)
    inputs = [t.to(DEVICE, dtype).requires_grad_() for t in (x, logits, w1, w2, b1)]
    _compiled_matches_eager(lambda x, l, w1, w2, b1: moe_mlp(x, topk_route(l, 2, backend="triton"), w1, w2, b1,
                                                             activation="swiglu", backend="triton",
                                                             recompute_hidden=False), *inputs)


@pytest.mark.skipif("triton" not in backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("D,activation,dtype,kept", [
    (32, "swiglu", torch.float16, True), (40, "swiglu", torch.float16, False),
    (32, "swiglu", torch.float32, False), (40, "gelu", torch.float16, True)])
def test_fake_returns_z_where_the_op_keeps_it(monkeypatch, D, activation, dtype, kept):
    """The forward op's fake implementation (what torch.compile traces) returns z [T*k, W1's width]
    exactly where the kernels keep it (``_moe_mlp_grouped.keeps_z``: a gated activation only on
    aligned tiles) and an empty tensor elsewhere, with the real op's shapes, strides and dtypes."""
    from moe_restore.kernels._moe_mlp_triton import moe_mlp_forward

    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "grouped")
    gen = torch.Generator().manual_seed(3)
    T, E, k, H = 13, 4, 2, 48
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    w1 = torch.randn(E, D, first_layer_width(activation, H), generator=gen).to(DEVICE, dtype)
    w2 = torch.randn(E, H, 32, generator=gen).to(DEVICE, dtype)
    r = topk_route(torch.randn(T, E, generator=gen).to(DEVICE), k, backend="triton")
    args = (x, r.weights, w1, w2, None, None, r.sorted_assignments, r.expert_offsets, activation, False, True)
    assert torch.library.opcheck(moe_mlp_forward, args, test_utils="test_faketensor") == {"test_faketensor": "SUCCESS"}
    assert moe_mlp_forward(*args)[1].shape == ((T * k, w1.shape[2]) if kept else (0,))


@pytest.mark.parametrize("backend", backends())
def test_nested_moe_compiles_without_graph_breaks(backend):
    skip_if_compiled_torch_backward_is_wrong(backend)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x, gl, el = torch.randn(30, 16, generator=gen), torch.randn(30, 3, generator=gen), torch.randn(30, 3, 2, generator=gen)
    w1, w2 = torch.randn(6, 16, 24, generator=gen), torch.randn(6, 24, 16, generator=gen)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, gl, el, w1, w2)]
    _compiled_matches_eager(lambda x, gl, el, w1, w2: moe_mlp(x, nested_route(gl, el, 2, 2, backend=backend), w1, w2,
                                                                              backend=backend), *inputs)


@pytest.mark.parametrize("backend", backends())
def test_nan_check_survives_compilation(backend):
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, l, w1, w2: moe_mlp(x, topk_route(l, 1, backend=backend), w1, w2,
                                                          backend=backend), fullgraph=True, backend="aot_eager")
    x, w1, w2 = torch.randn(8, 16), torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    logits = torch.randn(8, 2)
    compiled(x, logits, w1, w2)
    logits[3, 1] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        compiled(x, logits, w1, w2)


def test_torch_backend_compiles_once_for_every_token_count():
    skip_if_compiled_torch_backward_is_wrong("torch")
    """dynamic=True: one graph serves every T >= 2 (no size of the routing depends on its values,
    so nothing recompiles; T = 0 and 1 are specialised by torch.compile itself), and each T equals
    eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(4, 16, 24, generator=gen), torch.randn(4, 24, 8, generator=gen)

    def fn(x, logits):
        return moe_mlp(x, topk_route(logits, 2, backend="torch"), w1, w2, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, T in enumerate((9, 5, 17, 2)):
        x, logits = torch.randn(T, 16, generator=gen), torch.randn(T, 4, generator=gen)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            assert torch.equal(compiled(x, logits), fn(x, logits))


def test_compiled_torch_backward_is_refused_where_it_would_be_wrong():
    """On torch < 2.13 a fullgraph compile of the torch backend's autograd path raises (its traced
    backward gave zero gradients there) instead of returning wrong gradients; without fullgraph
    the call runs eagerly and its gradients equal the eager ones (Dynamo alone, backend "eager":
    the bug is in the trace, and no other compiler rounds differently)."""
    from moe_restore.kernels._moe_mlp_torch import COMPILED_BACKWARD_IS_WRONG

    if not COMPILED_BACKWARD_IS_WRONG:
        pytest.skip(f"torch {torch.__version__} compiles the torch backend's backward correctly")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    tensors = torch.randn(12, 8, generator=gen), torch.randn(12, 4, generator=gen), \
        torch.randn(4, 8, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)

    def fn(x, logits, w1, w2):
        return moe_mlp(x, topk_route(logits, 2, backend="torch"), w1, w2, backend="torch")

    def grads(f):
        inputs = [t.clone().requires_grad_() for t in tensors]
        f(*inputs).square().sum().backward()
        return [t.grad for t in inputs]

    with pytest.raises(Exception, match="needs torch >= 2.13"):
        grads(torch.compile(fn, fullgraph=True, backend="eager"))
    torch._dynamo.reset()
    for got, want in zip(grads(torch.compile(fn, backend="eager")), grads(fn)):
        torch.testing.assert_close(got, want)

"""Clear errors instead of wrong answers: the ops take strides, so transposed, sliced and expanded
views of x, the expert weights, the biases and the router logits give what contiguous copies give,
forward and backward; and CUDA tensors on a machine whose Triton cannot compile fall back to the
torch backend with a warning (or raise, when backend="triton" was asked for)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from moe_restore.kernels import _backend, moe_mlp, nested_route, topk_route
from utils import DEVICE, assert_close, backends

CASES = [(backend, path) for backend in backends() for path in (("fused", "grouped") if backend == "triton" else ("",))]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _strided_expert_inputs() -> dict[str, torch.Tensor]:
    """Leaf tensors whose views (``_VIEWS``) are the op's inputs."""
    E, D, H, T = 3, 10, 6, 13
    shapes = {"x": (T, D + 5), "w1": (E, 2 * H, D), "w2": (E, 2 * H, D), "b1": (2 * H, E), "b2": (1, D)}
    return {name: _randn(*shape, seed=i).requires_grad_() for i, (name, shape) in enumerate(shapes.items())}


# Non-contiguous views: x a column slice of a wider matrix, w1 a transpose of a [E, 2H, D] tensor
# (transformers' fused gate_up layout), w2 every other hidden row, b1 a transpose, b2 an expanded
# row (stride 0).
_VIEWS = {
    "x": lambda t: t[:, 2:12],
    "w1": lambda t: t.transpose(1, 2),
    "w2": lambda t: t[:, ::2],
    "b1": lambda t: t.t(),
    "b2": lambda t: t.expand(3, 10),
}


@pytest.mark.parametrize(("backend", "path"), CASES)
def test_moe_mlp_takes_strided_views(backend, path, monkeypatch):
    if path:
        monkeypatch.setenv("MOE_RESTORE_MLP_PATH", path)
    leaves = _strided_expert_inputs()
    logits = _randn(13, 3, seed=5)
    results = []
    for contiguous in (False, True):
        inputs = {name: _VIEWS[name](leaf) for name, leaf in leaves.items()}
        assert contiguous or not any(t.is_contiguous() for t in inputs.values())
        if contiguous:
            inputs = {name: t.contiguous() for name, t in inputs.items()}
        routing = topk_route(logits, 2, backend=backend)
        y = moe_mlp(inputs["x"], routing, inputs["w1"], inputs["w2"], inputs["b1"], inputs["b2"],
                    activation="swiglu", backend=backend)
        grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
        results.append((y.detach(), grads))
    (y, grads), (y_ref, grads_ref) = results
    assert_close(y, y_ref, torch.float32, backend=backend, what="output from strided views")
    for name, got, want in zip(leaves, grads, grads_ref):
        assert_close(got, want, torch.float32, backend=backend, what=f"grad {name}")


@pytest.mark.parametrize(("backend", "path"), CASES)
def test_moe_mlp_takes_a_routing_of_strided_views(backend, path, monkeypatch):
    """A Routing whose dispatch layout is a strided view (every other element of a buffer poisoned
    in between) gives what the contiguous one gives, forward and backward."""
    if path:
        monkeypatch.setenv("MOE_RESTORE_MLP_PATH", path)
    T, D, H, E = 13, 10, 6, 4
    x, w1, w2 = _randn(T, D, seed=1), _randn(E, D, H, seed=2) / D**0.5, _randn(E, H, D, seed=3) / H**0.5
    logits = _randn(T, E, seed=4).requires_grad_()
    routing = topk_route(logits, 2, backend=backend)

    def every_other(t: torch.Tensor) -> torch.Tensor:
        wide = torch.full((2 * t.numel(),), 10**9, dtype=t.dtype, device=t.device)
        wide[::2] = t.reshape(-1)
        return wide[::2].view(t.shape) if t.dim() == 1 else wide.view(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]

    weights_wide = torch.zeros(T, 4, device=DEVICE)
    weights_wide = weights_wide.index_copy(1, torch.tensor([0, 2], device=DEVICE), routing.weights)
    strided = dataclasses.replace(routing, weights=weights_wide[:, ::2], experts=every_other(routing.experts),
                                  sorted_assignments=every_other(routing.sorted_assignments),
                                  expert_offsets=every_other(routing.expert_offsets))
    assert not any(t.is_contiguous() for t in (strided.weights, strided.sorted_assignments, strided.expert_offsets))
    results = []
    for r in (strided, routing):
        y = moe_mlp(x, r, w1, w2, activation="gelu", backend=backend)
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), logits, retain_graph=True)[0]))
    (y, grad), (y_ref, grad_ref) = results
    assert_close(y, y_ref, torch.float32, backend=backend, what="output of a strided routing")
    assert_close(grad, grad_ref, torch.float32, backend=backend, what="router gradient of a strided routing")


def _logit_views(T: int, E: int, seed: int) -> dict[str, torch.Tensor]:
    return {"sliced": _randn(T, E + 4, seed=seed)[:, 1:1 + E], "transposed": _randn(E, T, seed=seed).t()}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_topk_route_forward_takes_strided_logits(layout, backend):
    logits = _logit_views(11, 5, seed=6)[layout]
    routing = topk_route(logits, 2, backend=backend)
    reference = topk_route(logits.contiguous(), 2, backend=backend)
    assert torch.equal(routing.experts, reference.experts)
    assert torch.equal(routing.weights, reference.weights)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_topk_route_backward_takes_strided_logits(layout, backend):
    base = _logit_views(11, 5, seed=7)[layout]
    grads = []
    for logits in (base, base.contiguous()):
        logits = logits.detach().requires_grad_()  # keeps the strides of the view
        assert logits.is_contiguous() == (len(grads) == 1)
        routing = topk_route(logits, 2, backend=backend)
        (routing.weights * torch.tensor([1.0, -2.0], device=DEVICE)).sum().backward()
        grads.append(logits.grad)
    assert_close(grads[0], grads[1], torch.float32, backend=backend, what="dlogits of strided logits")


@pytest.mark.parametrize("backend", backends())
def test_nested_route_takes_strided_logits(backend):
    group_views, expert_views = _logit_views(9, 3, seed=8)["transposed"], _logit_views(9, 6, seed=9)["sliced"]
    results = []
    for gl, el in ((group_views, expert_views), (group_views.contiguous(), expert_views.contiguous())):
        gl, el = gl.detach().requires_grad_(), el.detach().requires_grad_()
        routing = nested_route(gl, el, 2, 2, backend=backend)
        (routing.weights * torch.arange(4.0, device=DEVICE)).sum().backward()
        results.append((routing.experts, routing.weights.detach(), gl.grad, el.grad))
    for got, want, what in zip(results[0], results[1], ("experts", "weights", "dgroup_logits", "dexpert_logits")):
        if what == "experts":
            assert torch.equal(got, want)
        else:
            assert_close(got, want, torch.float32, backend=backend, what=what)


@pytest.fixture
def fresh_probes(monkeypatch):
    monkeypatch.setattr(_backend, "_CUDA_PROBES", {})
    monkeypatch.setattr(_backend, "HAS_TRITON", True)


def test_cuda_without_a_working_triton_falls_back_with_a_warning(fresh_probes, monkeypatch):
    monkeypatch.setattr(_backend, "_probe_cuda", lambda device: "RuntimeError: no compiler for sm_52")
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="Triton cannot compile for cuda:0 .*sm_52.*torch backend"):
        assert _backend.resolve_backend(None, cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probed once per device: no second warning
        assert _backend.resolve_backend(None, cuda) == "torch"
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here: .*sm_52"):
            _backend.resolve_backend("triton", cuda)


def test_cuda_with_a_working_triton_uses_it(fresh_probes, monkeypatch):
    probed = []
    monkeypatch.setattr(_backend, "_probe_cuda", lambda device: probed.append(device))
    assert _backend.resolve_backend(None, torch.device("cuda", 1)) == "triton"
    assert _backend.resolve_backend("triton", torch.device("cuda", 1)) == "triton"
    assert probed == [torch.device("cuda", 1)]


@pytest.mark.skipif("triton" not in backends() or DEVICE.type != "cpu", reason="runs the probe on the interpreter")
def test_probe_kernel_compiles_and_runs():
    assert _backend._probe_cuda(torch.device("cpu")) is None

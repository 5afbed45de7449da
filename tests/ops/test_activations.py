"""Activation specs (``moe_restore.kernels.activations``): moe_mlp with each new kind and each
gated parameter (clamp limit before or after the gate function, sigmoid slope, up offset,
interleaved gate/up columns) against the float64 oracle ``naive.moe_mlp``, forward and every
gradient, on every backend and both Triton paths (the grouped one also with the pre-activation
kept for backward, ``recompute_hidden=False``: path "grouped-keep"), at odd shapes (D, H, D_out not powers of two,
an expert with no tokens, one token); and the spec's parsing and validation."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import ActivationSpec, moe_mlp, naive, routing_from_topk
from moe_restore.kernels.activations import activation_spec, check_activation, first_layer_width
from utils import DEVICE, assert_close, backends, poisoned_allocations

GPT_OSS = ActivationSpec("swiglu", limit=0.6, alpha=1.702, up_offset=1.0, interleaved=True)
SPECS = {
    "relu2": ActivationSpec("relu2"),
    "geglu": ActivationSpec("geglu"),
    "geglu_tanh": ActivationSpec("geglu_tanh"),
    "gpt_oss": GPT_OSS,  # limit small enough that every clamp cuts some of the random values
    "gpt_oss_concatenated": ActivationSpec("swiglu", limit=0.6, alpha=1.702, up_offset=1.0),
    "clamp_then_silu": ActivationSpec("swiglu", limit=0.5),
    "silu_then_clamp": ActivationSpec("swiglu", limit=0.2, clamp_after=True),
    "geglu_tanh_interleaved_clamped": ActivationSpec("geglu_tanh", limit=0.5, up_offset=-0.25, interleaved=True),
    # Inkling-2's softcapped SwiGLU, caps small enough that tanh bends on the random values
    "inkling2": ActivationSpec("swiglu", gate_softcap=0.7, up_softcap=0.4),
    "softcaps_sloped_interleaved": ActivationSpec("swiglu", alpha=1.702, up_offset=1.0, interleaved=True,
                                                  gate_softcap=1.5, up_softcap=0.3),
    "geglu_up_softcap": ActivationSpec("geglu", up_softcap=0.5),
}
# T, D, H, D_out, E, k, bias; expert E-1 gets no token in every shape
SHAPES = {"odd": (13, 7, 5, 9, 4, 2, True), "one_token": (1, 6, 3, 5, 3, 2, False)}


def _paths(backend):
    return ["fused", "grouped", "grouped-keep"] if backend == "triton" else ["auto"]


def _problem(T, D, H, D_out, E, k, bias, spec, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cols = first_layer_width(spec, H)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    # experts 0 .. E-2 only, distinct per row: expert E-1 stays empty
    experts = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).float().to(DEVICE)
    params = [rand(T, D), rand(E, D, cols, scale=D**-0.5), rand(E, H, D_out, scale=H**-0.5)]
    if bias:
        params += [rand(E, cols, scale=0.5), rand(E, D_out, scale=0.5)]
    return experts, weights, params, rand(T, D_out)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("backend,path", [(b, p) for b in backends() for p in _paths(b)])
def test_matches_the_float64_oracle(monkeypatch, backend, path, name, shape):
    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", path.removesuffix("-keep"))
    spec = SPECS[name]
    T, D, H, D_out, E, k, bias = SHAPES[shape]
    dtype = torch.float32 if backend == "triton" else torch.float64
    experts, weights, params, upstream = _problem(T, D, H, D_out, E, k, bias, spec, dtype)
    weights = weights.requires_grad_()
    params = [p.requires_grad_() for p in params]
    x, w1, w2, *biases = params
    with poisoned_allocations():
        routing = routing_from_topk(experts, weights, E, backend=backend)
        y = moe_mlp(x, routing, w1, w2, *biases, activation=spec, backend=backend,
                    recompute_hidden=path != "grouped-keep")
        grads = torch.autograd.grad((y * upstream).sum(), params + [weights])

    ref = [p.detach().cpu().double().requires_grad_() for p in params + [weights]]
    rx, rw1, rw2, *rest = ref[:-1]
    want = naive.moe_mlp(rx, ref[-1], experts.cpu(), rw1, rw2, *rest, activation=spec)
    want_grads = torch.autograd.grad((want * upstream.cpu().double()).sum(), ref)
    assert_close(y, want, dtype, backend=backend, what=f"y ({spec})")
    names = ["dx", "dw1", "dw2", "db1", "db2"][:len(params)] + ["dweights"]
    for what, got, ref_grad in zip(names, grads, want_grads):
        # the routing keeps its weights, and so their gradient, in float32
        assert_close(got, ref_grad, torch.float32 if what == "dweights" else dtype, backend=backend,
                     what=f"{what} ({spec})")
    # the empty expert's parameters get exact zeros
    assert not grads[1][E - 1].any() and not grads[2][E - 1].any()


def test_clamps_cut_the_gradient_where_torch_clamp_does():
    """A gated spec's clamps, elementwise on the torch backend's derivative: zero past the bound,
    passed at the bound itself and inside (as torch.clamp's backward); the value computed with it
    is the activation's."""
    from moe_restore.kernels.activations import activate_and_backward

    limit = 1.0
    gate = torch.tensor([-3.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    up = torch.tensor([-2.0, -1.0, 0.3, 1.5], dtype=torch.float64)
    for spec in (ActivationSpec("swiglu", limit=limit), ActivationSpec("swiglu", limit=limit, clamp_after=True)):
        z = torch.cat([gate, up]).requires_grad_()
        h = naive.activate(z, spec)
        want, = torch.autograd.grad(h.sum(), z)
        value, got = activate_and_backward(torch.ones(4, dtype=torch.float64), z.detach(), spec)
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
        assert torch.allclose(value, h.detach(), rtol=1e-12, atol=0)
        assert got[4] == 0 and got[5] != 0 and got[7] == 0  # up: -2 cut, -1 (the bound) passes, 1.5 cut
    assert activate_and_backward(torch.ones(4, dtype=torch.float64), torch.cat([gate, up]),
                                 ActivationSpec("swiglu", limit=limit))[1][3] == 0  # gate 2 > limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.gated] + ["swiglu"])
def test_gated_derivative_written_in_place_equals_the_joined_one(monkeypatch, name, dtype):
    """Eager, a gated spec's dz is written half by half into one buffer (no join copy); traced
    by Dynamo, which takes no out= into a strided view, the halves are joined. act(z) is the same
    bit for bit; dz within 2 ulp (an elementwise kernel writing a strided view can take
    PyTorch's scalar loop where a contiguous output takes the vectorised one)."""
    from moe_restore.kernels.activations import activate_and_backward

    spec = SPECS.get(name, name)
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(37, 2 * 11, generator=gen) * 2).to(dtype)
    dh = torch.randn(37, 11, generator=gen).to(dtype)
    in_place = activate_and_backward(dh, z, spec)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    joined = activate_and_backward(dh, z, spec)
    assert torch.equal(in_place[0], joined[0])
    assert in_place[1].dtype == dtype and in_place[1].shape == z.shape
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(in_place[1], joined[1], rtol=2 * ulp, atol=2 * ulp * dh.abs().max().item())


@pytest.mark.parametrize("spec", list(SPECS.values()) + ["gelu", "swiglu", "relu"])
def test_canonical_string_round_trips(spec):
    text = check_activation(spec)
    assert activation_spec(text) == activation_spec(spec)
    if isinstance(spec, str):
        assert text == spec  # a plain name stays itself


def test_gpt_oss_string():
    assert str(GPT_OSS) == "swiglu(limit=0.6,alpha=1.702,up_offset=1.0,interleaved=True)"


def test_inkling2_string():
    assert str(SPECS["inkling2"]) == "swiglu(gate_softcap=0.7,up_softcap=0.4)"


@pytest.mark.parametrize("make,match", [
    (lambda: ActivationSpec("tanh"), "activation must be one of"),
    (lambda: ActivationSpec("gelu", limit=1.0), "is not gated"),
    (lambda: ActivationSpec("relu2", interleaved=True), "is not gated"),
    (lambda: ActivationSpec("geglu", alpha=1.702), "alpha"),
    (lambda: ActivationSpec("swiglu", limit=0.0), "limit must be > 0"),
    (lambda: ActivationSpec("swiglu", limit=float("inf")), "finite"),
    (lambda: ActivationSpec("swiglu", clamp_after=True), "clamp_after needs a limit"),
    (lambda: ActivationSpec("swiglu", interleaved=1), "must be a bool"),
    (lambda: ActivationSpec("swiglu", gate_softcap=0.0), "gate_softcap must be > 0"),
    (lambda: ActivationSpec("swiglu", up_softcap=float("nan")), "finite"),
    (lambda: ActivationSpec("geglu", gate_softcap=1.0), "swiglu only"),
    (lambda: ActivationSpec("silu", up_softcap=1.0), "is not gated"),
    (lambda: ActivationSpec("swiglu", limit=1.0, up_softcap=1.0), "limit or softcaps, not both"),
    (lambda: activation_spec("swiglu(limit=7.0"), "expected kind"),
    (lambda: activation_spec("swiglu(slope=2.0)"), "is not one of"),
    (lambda: activation_spec("swiglu(limit=seven)"), "no number"),
    (lambda: activation_spec(3), "activation must be one of"),
])
def test_bad_specs_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_moe_mlp_names_a_gated_layout_by_its_width():
    T, D, H, E = 4, 6, 5, 3
    routing = routing_from_topk(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), E, backend="torch")
    with pytest.raises(ValueError, match=r"\[E, D, 2H\]"):
        moe_mlp(torch.randn(T, D), routing, torch.randn(E, D, H), torch.randn(E, H, D), activation=GPT_OSS,
                backend="torch")


def test_gated_specs_take_the_grouped_path(monkeypatch):
    """The automatic path choice (compile check on Triton 3.6 and 3.9, see ``use_fused_path``): every
    gated spec, plain swiglu included, takes the grouped path at any width; an ungated one (relu2)
    stays fused at the aligned widths up to 64 and leaves it at 128 or an odd width;
    MOE_RESTORE_MLP_PATH=fused still pins the fused path."""
    from moe_restore.kernels._moe_mlp_triton import use_fused_path

    monkeypatch.delenv("MOE_RESTORE_MLP_PATH", raising=False)
    for spec in ("swiglu", GPT_OSS, SPECS["silu_then_clamp"], SPECS["geglu"], ActivationSpec("swiglu", alpha=1.702)):
        assert not use_fused_path(16, 16, spec, torch.bfloat16)
    assert use_fused_path(64, 64, SPECS["relu2"], torch.bfloat16)
    assert not use_fused_path(128, 128, SPECS["relu2"], torch.bfloat16)
    assert not use_fused_path(100, 64, SPECS["relu2"], torch.bfloat16)
    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "fused")
    assert use_fused_path(16, 16, GPT_OSS, torch.bfloat16)

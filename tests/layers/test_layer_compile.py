"""Layer-level torch.compile and autocast.

torch.compile(fullgraph=True) (backend "aot_eager" on the CPU, on both backends: the Triton
kernels under the interpreter, and the torch backend) of
the layers in their fuller configurations (2d variants, shared experts, sigmoid scoring, group
context), of the block that replace_moe puts into transformers models and of MambaStyleAttention:
no graph breaks, and the compiled forward and backward equal eager. Under float16 autocast (on
the CPU) the layers return float16, keep the router math in float32 and stay within the float16
tolerance of a float64 oracle."""
from __future__ import annotations

import copy

import pytest
import torch

from moe_restore.layers import TopKMoE, TopKMoE2d
from moe_restore.layers.nested_moe import NestedMoE, NestedMoE2d
from moe_layer_oracle import (assert_compiled_layer_matches_eager, expert64, float64_params, random_input,
                              softmax64, top_indices)
from utils import DEVICE, assert_close, backends, skip_if_compiled_torch_backward_is_wrong

needs_triton = pytest.mark.skipif("triton" not in backends(), reason="compiles the Triton path (custom ops)")


@pytest.mark.parametrize("backend", backends())
def test_topk_moe_2d_with_shared_experts_compiles(backend):
    skip_if_compiled_torch_backward_is_wrong(backend)
    torch.manual_seed(0)
    layer = TopKMoE2d(8, 12, 5, 2, num_shared_experts=1, scoring="sigmoid", activation="swiglu",
                      backend=backend).to(DEVICE)
    assert_compiled_layer_matches_eager(layer, random_input((2, 8, 3, 5), seed=1))


@pytest.mark.parametrize("backend", backends())
def test_nested_moe_2d_with_context_compiles(backend):
    skip_if_compiled_torch_backward_is_wrong(backend)
    torch.manual_seed(2)
    layer = NestedMoE2d(8, 12, 3, 2, 2, 1, num_shared_experts=1, group_context_dim=4, backend=backend).to(DEVICE)
    assert_compiled_layer_matches_eager(layer, random_input((2, 8, 3, 3), seed=3), random_input((2, 4), seed=4))


def _qwen2_block():
    """A Qwen2-MoE sparse block (gated shared expert) and its replace_moe replacement."""
    tf = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from moe_restore.integration import replace_moe

    config = tf.Qwen2MoeConfig(hidden_size=8, moe_intermediate_size=12, shared_expert_intermediate_size=10,
                               num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(5)
    original = Qwen2MoeSparseMoeBlock(config).to(DEVICE)
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0.0, 0.5)
    original.experts.config._experts_implementation = "eager"  # the per-expert loop, any dtype
    return original, replace_moe(copy.deepcopy(original)).model


def _assert_compiles_to_eager(module: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.compile(fullgraph=True) traces ``module`` (a graph break raises) and the compiled
    output and gradients (input and every parameter) equal eager's."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")

    def output_and_gradients(run):
        leaf = x.detach().clone().requires_grad_()
        y = run(leaf)
        return [y.detach(), *torch.autograd.grad(y.square().sum(), [leaf, *module.parameters()])]

    got, want = output_and_gradients(compiled), output_and_gradients(module)
    assert len(got) == len(want) == 2 + len(list(module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", backends())
def test_replaced_transformers_block_compiles(backend):
    skip_if_compiled_torch_backward_is_wrong(backend)
    _, block = _qwen2_block()
    block.backend = backend
    _assert_compiles_to_eager(block, random_input((2, 5, 8), seed=6))


def _separated_router_(router: torch.nn.Module, x: torch.Tensor) -> None:
    """Router logits = scale_e * x[:, 0] with |x[:, 0]| >= 1: far apart, so float16 rounding cannot
    change any expert choice."""
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = 4.0 * torch.arange(1, router.weight.shape[0] + 1, dtype=router.weight.dtype)
        if getattr(router, "bias", None) is not None:
            router.bias.zero_()
        x[:, 0] = torch.where(x[:, 0] < 0, -1.0, 1.0) * (x[:, 0].abs() + 1)


def _topk_oracle(params: dict[str, torch.Tensor], tokens: torch.Tensor, k: int) -> torch.Tensor:
    """TopKMoE (softmax, renormalised, gelu experts) token by token in float64."""
    rows = []
    for u in tokens:
        p = softmax64(params["router.weight"] @ u)
        experts = top_indices(p, k)
        total = sum(p[e] for e in experts)
        rows.append(sum(p[e] / total * expert64(params, "experts.", e, u, "gelu") for e in experts))
    return torch.stack(rows)


def _nested_oracle(params: dict[str, torch.Tensor], tokens: torch.Tensor, groups: int, per_group: int,
                   k_groups: int, k_experts: int) -> torch.Tensor:
    """NestedMoE (renormalised at both levels, gelu experts) token by token in float64."""
    rows = []
    for u in tokens:
        p = softmax64(params["router.group_router.weight"] @ u + params["router.group_router.bias"])
        el = params["router.expert_router.weight"] @ u + params["router.expert_router.bias"]
        chosen = top_indices(p, k_groups)
        y = torch.zeros(params["experts.w2"].shape[-1], dtype=torch.float64)
        for g in chosen:
            q = p[g] / sum(p[c] for c in chosen)
            r = softmax64(el[g * per_group:(g + 1) * per_group])
            subs = top_indices(r, k_experts)
            for e in subs:
                y = y + q * r[e] / sum(r[s] for s in subs) * expert64(params, "experts.", g * per_group + e, u, "gelu")
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", backends())
def test_topk_moe_under_float16_autocast(backend):
    torch.manual_seed(7)
    layer = TopKMoE(8, 16, 4, 2, backend=backend).to(DEVICE)
    x = random_input((11, 8), seed=8).detach()
    _separated_router_(layer.router, x)
    y64 = _topk_oracle(float64_params(layer), x.double().cpu(), 2)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16 and layer.last_routing.weights.dtype == torch.float32
    assert_close(y, y64, torch.float16, backend=backend, what="autocast TopKMoE")


@pytest.mark.parametrize("backend", backends())
def test_nested_moe_under_float16_autocast(backend):
    torch.manual_seed(9)
    layer = NestedMoE(8, 16, 3, 2, 2, 1, backend=backend).to(DEVICE)
    x = random_input((10, 8), seed=10).detach()
    _separated_router_(layer.router.group_router, x)
    with torch.no_grad():  # sub-expert logits far apart too (column 1 has |x| of order 1, kept fixed)
        layer.router.expert_router.weight.zero_()
        layer.router.expert_router.bias.copy_(torch.tensor([0.0, 3.0, 3.0, 0.0, 0.0, 3.0]))
    y64 = _nested_oracle(float64_params(layer), x.double().cpu(), 3, 2, 2, 1)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = layer(x)
    routing = layer.last_routing
    assert y.dtype == torch.float16
    assert routing.weights.dtype == routing.group_weights.dtype == torch.float32
    assert_close(y, y64, torch.float16, backend=backend, what="autocast NestedMoE")


@pytest.mark.parametrize("backend", backends())
def test_replaced_transformers_block_under_float16_autocast(backend):
    original, block = _qwen2_block()
    block.backend = backend
    x = random_input((9, 8), seed=11).detach()
    _separated_router_(original.gate, x)
    _separated_router_(block.gate, x.clone())
    want = original.double()(x.double()[None])[0]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = block(x)
    # The expert GEMMs run in float16; like the stock block, the experts module (transformers'
    # experts hook) returns the hidden states' dtype.
    assert y.dtype == x.dtype == torch.float32
    assert_close(y, want, torch.float16, backend=backend, what="autocast replaced block")


@needs_triton
def test_mamba_style_attention_compiles():
    from moe_restore.layers.mamba_attention import MambaStyleAttention

    torch.manual_seed(12)
    _assert_compiles_to_eager(MambaStyleAttention(8, d_state=4).to(DEVICE), random_input((1, 8, 3, 5), seed=13))

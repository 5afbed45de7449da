"""Deterministic mode: every MoE kernel path (top-k and nested routing, moe_mlp fused and grouped,
both backends) gives bitwise-identical results, forward and backward, run after run, with
torch.use_deterministic_algorithms(True) on (which also makes torch raise on any nondeterministic
op it reaches); deterministic mode pins the kernel configurations (no timing-based autotuning)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import _tuning, moe_mlp, nested_route, settings, topk_route
from utils import DEVICE, backends

# (backend, moe_mlp path of the Triton backend); the torch backend has one path.
CASES = [(backend, path) for backend in backends() for path in (("fused", "grouped") if backend == "triton" else ("",))]


@pytest.fixture
def deterministic_algorithms():
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _inputs(activation: str, seed: int) -> list[torch.Tensor]:
    """x [37, 12], top-k logits [37, 5], nested logits [37, 2] and [37, 2, 3], expert weights for
    6 experts (the nested bank; top-k uses the first 5), biases."""
    g = torch.Generator().manual_seed(seed)
    cols = 40 if activation == "swiglu" else 20
    shapes = [(37, 12), (37, 5), (37, 2), (37, 2, 3), (6, 12, cols), (6, 20, 12), (6, cols), (6, 12)]
    return [torch.randn(s, generator=g).to(DEVICE).requires_grad_() for s in shapes]


def _run(inputs: list[torch.Tensor], activation: str, backend: str, nested: bool):
    """(output, gradient of every input) of one forward and backward."""
    x, logits, group_logits, expert_logits, w1, w2, b1, b2 = inputs
    if nested:
        routing = nested_route(group_logits, expert_logits, 2, 2, backend=backend)
    else:
        routing = topk_route(logits, 2, backend=backend)
        w1, w2, b1, b2 = w1[:5], w2[:5], b1[:5], b2[:5]
    y = moe_mlp(x, routing, w1, w2, b1, b2, activation=activation, backend=backend)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[1], device=y.device)).square().sum(), inputs,
                                allow_unused=True)
    return y.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("nested", [False, True], ids=["topk", "nested"])
@pytest.mark.parametrize(("backend", "path"), CASES)
def test_repeated_runs_are_bitwise_identical(backend, path, nested, deterministic_algorithms, monkeypatch):
    if path:
        monkeypatch.setenv("MOE_RESTORE_MLP_PATH", path)
    for activation in ("swiglu", "gelu"):
        inputs = _inputs(activation, seed=11)
        first_y, first_grads = _run(inputs, activation, backend, nested)
        again_y, again_grads = _run(inputs, activation, backend, nested)
        assert torch.isfinite(first_y).all()
        assert torch.equal(first_y, again_y), f"{activation}: outputs differ between runs"
        assert len(first_grads) == len(again_grads) == (7 if nested else 6)
        for i, (a, b) in enumerate(zip(first_grads, again_grads)):
            assert torch.equal(a, b), f"{activation}: gradient {i} differs between runs"


def test_replaced_transformers_block_is_deterministic(deterministic_algorithms):
    tf = pytest.importorskip("transformers")
    from moe_restore.integration import replace_moe

    config = tf.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                               num_experts=5, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1)
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(12)
    original = Qwen2MoeSparseMoeBlock(config).to(DEVICE)
    with torch.no_grad():
        for p in original.parameters():  # the block's fused expert tensors start uninitialised
            p.normal_(0.0, 0.5)
    block = replace_moe(original).model
    x = torch.randn(3, 7, 16, device=DEVICE, requires_grad=True)
    results = []
    for _ in range(2):
        y = block(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
        results.append((y, grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("switch", ["environment", "torch"])
def test_deterministic_mode_pins_kernel_configurations(switch, monkeypatch):
    pytest.importorskip("triton")
    default, candidates = {"BLOCK_M": 32}, [{"BLOCK_M": 64}, {"BLOCK_M": 128}]
    monkeypatch.setattr(settings, "INTERPRET", False)  # as on a GPU, where the candidates are timed
    monkeypatch.delenv("MOE_RESTORE_AUTOTUNE", raising=False)
    monkeypatch.delenv("MOE_RESTORE_DETERMINISTIC", raising=False)
    assert not _tuning.deterministic()
    assert len(_tuning.kernel_configs("k", default, candidates)) == 3
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if switch == "environment":
            monkeypatch.setenv("MOE_RESTORE_DETERMINISTIC", "1")
        else:
            torch.use_deterministic_algorithms(True)
        assert _tuning.deterministic()
        (config,) = _tuning.kernel_configs("k", default, candidates)
        assert config.kwargs == default
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])

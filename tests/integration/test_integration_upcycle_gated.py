"""upcycle_ffn on gated MLPs (Llama-style gate/up/down, timm-style GluMlp) and transformers'
activation modules: the upcycled model computes the dense function at initialisation (the original
run in float64 is the oracle, <= 1e-5 relative) and trains; modules it cannot convert, including
wrong shapes, are named in the report with the reason instead of raising."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moe_restore.integration import upcycle_ffn
from moe_restore.layers import TopKMoE
from utils import DEVICE, backends

tf = pytest.importorskip("transformers")


class GluMlp(nn.Module):
    """timm's GluMlp layout: fc1 to [x1 | x2], x1 * act(x2) (gate_last) or act(x1) * x2, fc2."""

    def __init__(self, dim: int, hidden: int, act: nn.Module, gate_last: bool = True):
        super().__init__()
        self.chunk_dim, self.gate_last = -1, gate_last
        self.fc1, self.act, self.drop1 = nn.Linear(dim, 2 * hidden), act, nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _upcycle_keeps_function(model: nn.Module, backend: str, **kwargs):
    torch.manual_seed(1)
    model = model.to(DEVICE).eval()
    oracle = copy.deepcopy(model).double()
    x = torch.randn(2, 5, 12, device=DEVICE)
    report = upcycle_ffn(model, num_experts=3, top_k=2, backend=backend, **kwargs)
    y = report.model(x)
    assert _rel(y, oracle(x.double())) <= 1e-5
    layers = [m for m in report.model.modules() if isinstance(m, TopKMoE)]
    assert layers
    y.square().mean().backward()  # trainable: every expert and router parameter gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in layers for p in m.parameters())
    return report


def _llama_mlp(act: str = "silu"):
    config = tf.LlamaConfig(hidden_size=12, intermediate_size=20, hidden_act=act, num_attention_heads=2,
                            num_key_value_heads=1)
    return tf.models.llama.modeling_llama.LlamaMLP(config)


@pytest.mark.parametrize("backend", backends())
def test_llama_mlp_keeps_its_function(backend):
    torch.manual_seed(0)
    report = _upcycle_keeps_function(nn.Sequential(_llama_mlp()), backend)
    (change,) = report.replaced
    assert (change.name, change.before) == ("0", "LlamaMLP") and "stacked" in change.detail


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("gate_last", [True, False])
def test_glu_mlp_keeps_its_function(backend, gate_last):
    torch.manual_seed(0)
    report = _upcycle_keeps_function(nn.Sequential(GluMlp(12, 10, nn.SiLU(), gate_last)), backend)
    assert [c.name for c in report.replaced] == ["0"] and ("reordered" in report.replaced[0].detail) == gate_last


def test_glu_mlp_with_match_does_not_crash():
    model = nn.Sequential(GluMlp(12, 10, nn.SiLU()), GluMlp(12, 10, nn.GELU()))
    report = _upcycle_keeps_function(model, "torch", match=lambda name, m: isinstance(m, GluMlp))
    assert [c.name for c in report.replaced] == ["0"]
    (skip,) = report.skipped
    assert skip.name == "1" and "SiLU only" in skip.reason


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "silu"])
def test_transformers_activation_modules(act):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), tf.activations.ACT2FN[act], nn.Linear(16, 12))
    _upcycle_keeps_function(nn.Sequential(mlp), "torch", match=lambda name, m: name == "0")


def test_unsupported_gated_and_shapes_are_reported():
    model = nn.Sequential(_llama_mlp("gelu"), nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(8, 12)))
    report = upcycle_ffn(model, num_experts=2, top_k=1, match=lambda name, m: name in ("0", "1"))
    assert not report.replaced
    reasons = {s.name: s.reason for s in report.skipped}
    assert "SiLU only" in reasons["0"] and "16 features but the second takes 8" in reasons["1"]
    assert isinstance(report.model[0], tf.models.llama.modeling_llama.LlamaMLP)

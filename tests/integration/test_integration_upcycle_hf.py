"""upcycle_ffn on the MLPs of transformers' encoders: ViT's ``ViTMLP`` (fc1, activation_fn, fc2) and
the split MLPs (an ``*Intermediate`` module whose second Linear sits in its sibling ``output``, which
also adds the residual: DPT's ViT layer, BERT with its norm after the residual). At initialisation the
upcycled model computes what the original computes (the original run in float64 is the oracle,
<= 1e-5 relative) and trains; a module of such a kind that cannot be converted is named with the
reason, and a model without any candidate gets a report that says what was looked for."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moe_restore.integration import upcycle_ffn
from moe_restore.layers import TopKMoE
from utils import DEVICE

tf = pytest.importorskip("transformers")
TOL = 1e-5
_SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


def _vit(act: str = "gelu"):
    return tf.ViTModel(tf.ViTConfig(**_SMALL, image_size=8, patch_size=4, hidden_act=act))


def _check_upcycled(model: nn.Module, inputs: torch.Tensor, run, names: list[str]):
    """Upcycle ``model`` (eval) in place; the output equals the float64 original, the report names
    ``names``, and every new layer's parameters get a gradient."""
    model = model.to(DEVICE).eval()
    oracle = copy.deepcopy(model).double()
    want = run(oracle, inputs.double() if inputs.is_floating_point() else inputs)
    report = upcycle_ffn(model, num_experts=3, top_k=2, backend="torch")
    assert [c.name for c in report.replaced] == names and not report.skipped
    got = run(model, inputs)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= TOL, f"upcycled output: relative error {err:.1e}"
    got.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, TopKMoE)]
    assert len(layers) == len(names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in layers for p in m.parameters())
    return report


def _hidden(model, inputs):
    return model(inputs).last_hidden_state


def test_vit_mlp_keeps_its_function():
    torch.manual_seed(0)
    report = _check_upcycled(_vit(), torch.randn(2, 3, 8, 8, device=DEVICE), _hidden,
                             ["layers.0.mlp", "layers.1.mlp"])
    assert report.replaced[0].before == "ViTMLP" and "gelu" in report.replaced[0].detail


def test_bert_split_mlp_keeps_its_function():
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(**_SMALL, vocab_size=50, max_position_embeddings=16))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    report = _check_upcycled(model, ids, _hidden, [f"encoder.layer.{i}.intermediate" for i in range(2)])
    assert isinstance(model.encoder.layer[0].output.dense, nn.Identity)
    assert "sibling output.dense" in report.replaced[0].detail


def test_dpt_vit_layer_split_mlp_keeps_its_function():
    """DPT's ViT layer: DPTViTIntermediate, and DPTViTOutput = dropout(dense(h)) + residual."""
    from transformers.models.dpt.modeling_dpt import DPTViTLayer

    torch.manual_seed(0)
    layer = DPTViTLayer(tf.DPTConfig(**_SMALL))
    layer.attention.attention.config._attn_implementation = "eager"

    def run(module, x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    _check_upcycled(layer, torch.randn(2, 5, 16, device=DEVICE), run, ["intermediate"])


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.intermediate_act_fn = nn.Linear(8, 12), nn.GELU()

    def forward(self, h):
        return self.intermediate_act_fn(self.dense(h))


class NormFirstOutput(nn.Module):
    """An output module that normalises before its dense: with an Identity for the dense it fails."""

    def __init__(self):
        super().__init__()
        self.norm, self.dense = nn.LayerNorm(12), nn.Linear(12, 8)

    def forward(self, h, residual):
        return self.dense(self.norm(h)) + residual


class TanhFirstOutput(NormFirstOutput):
    """With an Identity for the dense it runs, and computes something else."""

    def forward(self, h, residual):
        return self.dense(torch.tanh(h)) + residual


class Layer(nn.Module):
    def __init__(self, output: type):
        super().__init__()
        self.intermediate, self.output = Intermediate(), output()


for _cls in (Intermediate, NormFirstOutput, TanhFirstOutput, Layer):  # as transformers' classes are recognised
    _cls.__module__ = "transformers.models.fake.modeling_fake"


def test_unconvertible_kinds_are_named_with_the_reason():
    vit = _vit("quick_gelu")
    layer, tanh_layer = Layer(NormFirstOutput), Layer(TanhFirstOutput)
    model = nn.ModuleDict({"vit": vit, "layer": layer, "tanh": tanh_layer})
    report = upcycle_ffn(model, num_experts=2, top_k=1)
    assert not report.replaced and not report.note
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"vit.layers.0.mlp", "vit.layers.1.mlp", "layer.intermediate", "tanh.intermediate"}
    assert "QuickGELUActivation has no moe_mlp counterpart" in reasons["vit.layers.0.mlp"]
    assert "NormFirstOutput applying dense to its first input first" in reasons["layer.intermediate"]
    assert "fails: RuntimeError" in reasons["layer.intermediate"]
    assert reasons["tanh.intermediate"].endswith("TanhFirstOutput applying dense to its first input first, checked "
                                                 "on a random input, does not hold")
    for unchanged in (layer, tanh_layer):
        assert isinstance(unchanged.intermediate, Intermediate) and isinstance(unchanged.output.dense, nn.Linear)


def test_nothing_found_says_why():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = upcycle_ffn(model, num_experts=2, top_k=1)
    assert report.replaced == [] and report.skipped == []
    assert "no candidate FFN found: looked for" in str(report) and "ViTMLP" not in report.note
    assert "fc1, activation_fn, fc2" in report.note
    report = upcycle_ffn(model, num_experts=2, top_k=1, match=lambda name, module: False)
    assert report.note == "no candidate FFN found: match selected no module"

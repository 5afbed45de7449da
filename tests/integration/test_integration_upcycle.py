"""upcycle_ffn: dense FFNs (diffusers FeedForward, timm-style Mlp, any two-Linear MLP a match selects)
become TopKMoE / NestedMoE layers that compute the dense function at initialisation (the original
module run in float64 is the oracle); modules it cannot convert are left alone and named."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moe_restore.integration import upcycle_ffn
from moe_restore.layers import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE
from utils import DEVICE, assert_close, backends, poisoned_allocations

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock, FeedForward  # noqa: E402


class Mlp(nn.Module):
    """timm's Mlp layout: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, dim: int, hidden: int, act: nn.Module, drop: float = 0.0, norm: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), act, nn.Dropout(drop)
        self.norm = norm or nn.Identity()
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def _input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _assert_keeps_function(model: nn.Module, x: torch.Tensor, backend: str, **kwargs):
    """Upcycle ``model`` (eval mode) and check its output against the dense original in float64."""
    model = model.to(DEVICE).eval()
    oracle = copy.deepcopy(model).double()
    report = upcycle_ffn(model, backend=backend, **kwargs)
    with poisoned_allocations():
        y = report.model(x)
    assert_close(y, oracle(x.double()), torch.float32, backend=backend, what="upcycled output")
    return report


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("activation", ["gelu", "gelu-approximate", "swiglu", "linear-silu"])
def test_diffusers_feed_forward_keeps_its_function(activation, backend):
    torch.manual_seed(0)
    ff = FeedForward(12, dim_out=10, mult=2, activation_fn=activation)
    report = _assert_keeps_function(nn.Sequential(ff), _input(2, 5, 12), backend, num_experts=3, top_k=2)
    (change,) = report.replaced
    assert (change.name, change.before, change.after) == ("0", "FeedForward", "TopKMoE")
    layer = report.model[0]
    assert layer.experts.num_experts == 3 and layer.router.top_k == 2 and layer.out_dim == 10
    assert ("reordered" in change.detail) == (activation == "swiglu")


@pytest.mark.parametrize("backend", backends())
def test_nested_upcycling_of_a_dit_block(backend):
    """A diffusers transformer block (attention + FeedForward, tanh GELU as in DiT) keeps its output."""
    torch.manual_seed(1)
    block = BasicTransformerBlock(16, 2, 8, activation_fn="gelu-approximate")
    report = _assert_keeps_function(block, _input(2, 6, 16, seed=1), backend, nested=(3, 2, 2, 1))
    assert [(c.name, c.after) for c in report.replaced] == [("ff", "NestedMoE")]
    assert isinstance(block.ff, NestedMoE) and block.ff.experts.activation == "gelu_tanh"
    assert block.ff.experts.num_experts == 6 and "3 groups x 2 experts" in report.replaced[0].detail


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ReLU()], ids=["gelu", "silu", "relu"])
def test_timm_style_mlp_keeps_its_function(act, backend):
    torch.manual_seed(2)
    model = nn.Sequential(nn.LayerNorm(8), Mlp(8, 20, act))
    report = _assert_keeps_function(model, _input(3, 4, 8, seed=2), backend, num_experts=4, top_k=1)
    assert [(c.name, c.before) for c in report.replaced] == [("1", "Mlp")]
    assert isinstance(model[1], TopKMoE) and isinstance(model[0], nn.LayerNorm)


def test_match_selects_any_two_linear_mlp():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Dropout(0.0), nn.Linear(9, 6))
    model = nn.ModuleDict({"mlp": mlp, "other": nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))})
    oracle = copy.deepcopy(mlp).double()
    report = upcycle_ffn(model, num_experts=2, top_k=2, match=lambda name, m: isinstance(m, nn.Sequential),
                         backend="torch")
    assert [c.name for c in report.replaced] == ["mlp"]
    assert [(s.name, s.kind) for s in report.skipped] == [("other", "Sequential")]
    assert "Linear, activation, Linear" in report.skipped[0].reason
    x = _input(5, 6, seed=3)
    assert_close(model["mlp"](x), oracle(x.double()), torch.float32, what="matched MLP")


def test_unconvertible_ffns_are_left_alone_and_named():
    model = nn.ModuleList([FeedForward(8, activation_fn="geglu"), FeedForward(8, dropout=0.1),
                           Mlp(8, 16, nn.Tanh()), Mlp(8, 16, nn.GELU(), norm=nn.LayerNorm(16)),
                           Mlp(8, 16, nn.GELU())])
    kept = list(model)
    report = upcycle_ffn(model, num_experts=2, top_k=1)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "GEGLU" in reasons["0"] and "dropout p=0.1" in reasons["1"]
    assert "Tanh" in reasons["2"] and "norm" in reasons["3"]
    assert [c.name for c in report.replaced] == ["4"]
    assert all(model[i] is kept[i] for i in range(4)) and isinstance(model[4], TopKMoE)


def test_noise_breaks_the_symmetry_and_the_layer_trains():
    torch.manual_seed(4)
    model = nn.Sequential(Mlp(8, 16, nn.GELU()))
    report = upcycle_ffn(model, num_experts=3, top_k=2, noise_std=0.05, backend="torch")
    layer = model[0]
    assert not torch.equal(layer.experts.w1[0], layer.experts.w1[1]) and "noise" in report.replaced[0].detail
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = _input(16, 8, seed=4), _input(16, 8, seed=5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean() + 0.01 * layer.aux_loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0] and layer.router.weight.grad.abs().sum() > 0


def test_bad_arguments_are_refused_by_name():
    model = nn.Sequential(Mlp(4, 8, nn.GELU()))
    with pytest.raises(ValueError, match="num_experts and top_k are required"):
        upcycle_ffn(model, num_experts=4)
    with pytest.raises(ValueError, match="top_k=3 disagrees with nested"):
        upcycle_ffn(model, top_k=3, nested=(2, 2, 1, 1))
    with pytest.raises(ValueError, match="nested must be a tuple"):
        upcycle_ffn(model, nested=(2, 2))
    with pytest.raises(ValueError, match="noise_std"):
        upcycle_ffn(model, num_experts=2, top_k=1, noise_std=-1.0)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="noise_std must be a finite number"):
            upcycle_ffn(model, num_experts=2, top_k=1, noise_std=bad)
    with pytest.raises(TypeError, match="match must be a callable"):
        upcycle_ffn(model, num_experts=2, top_k=1, match="fc")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        upcycle_ffn(None, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        upcycle_ffn(model, num_experts=2, top_k=1, backend="gpu")

"""TopKMoE and TopKMoE2d against a float64 per-token loop of the layer's math, on every backend here."""
from __future__ import annotations

import math

import pytest
import torch

from moe_restore.kernels import Routing
from moe_restore.layers.topk_moe import TopKMoE, TopKMoE2d
from moe_layer_oracle import (TOKENS, activation64, assert_compiled_layer_matches_eager, assert_gradients_close,
                              float64_params, oracle_topk_moe, random_input)
from utils import DEVICE, assert_close, backends, poisoned_allocations, raising_backends


def run_against_oracle(layer: TopKMoE, x: torch.Tensor, tokens_of, backend: str) -> list[list[int]]:
    """Forward and backward of (y * g).sum() + aux_loss + router_z_loss on the layer (outputs
    poisoned) and on the oracle; assert every output, loss and gradient agree. ``tokens_of`` maps
    an input to its [T, dim] tokens and back (for 2-D layouts)."""
    params = float64_params(layer)
    x64 = x.detach().double().cpu().requires_grad_()
    to_tokens, from_tokens = tokens_of
    y64, aux64, z64, chosen = oracle_topk_moe(layer, params, to_tokens(x64))
    y64 = from_tokens(y64, x64)
    g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ((y64 * g).sum() + aux64 + z64).backward()

    with poisoned_allocations():
        y = layer(x)
        ((y * g.to(y)).sum() + layer.aux_loss + layer.router_z_loss).backward()
    assert y.shape == y64.shape and y.dtype == x.dtype
    assert_close(y, y64, x.dtype, backend=backend, what="output")
    assert_close(layer.aux_loss, aux64, torch.float32, backend=backend, what="aux_loss")
    assert_close(layer.router_z_loss, z64, torch.float32, backend=backend, what="router_z_loss")
    assert isinstance(layer.last_routing, Routing)
    assert layer.last_routing.experts.tolist() == chosen
    assert_gradients_close(layer, params, x, x64, backend)
    return chosen


PIXELS = (lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),
          lambda y, x: y.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2))

# (input shape, layer arguments): odd widths, T = 1 and k = E, E = 1, each activation, with and
# without biases and shared experts, both scorings, out_dim != dim.
CASES = [
    ((3, 7, 12), dict(dim=12, hidden_dim=20, num_experts=5, top_k=2)),
    ((13, 9), dict(dim=9, hidden_dim=16, num_experts=4, top_k=1, activation="swiglu", bias=False,
                   num_shared_experts=2, scoring="sigmoid", out_dim=5)),
    ((1, 16), dict(dim=16, hidden_dim=24, num_experts=3, top_k=3, activation="silu", num_shared_experts=1)),
    ((2, 3, 8), dict(dim=8, hidden_dim=10, num_experts=1, top_k=1, activation="relu", scoring="sigmoid")),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape,args", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_topk_moe_matches_oracle(shape, args, backend):
    torch.manual_seed(0)
    layer = TopKMoE(**args, backend=backend).to(DEVICE)
    run_against_oracle(layer, random_input(shape), TOKENS, backend)


@pytest.mark.parametrize("backend", backends())
def test_topk_moe_2d_matches_oracle_per_pixel(backend):
    torch.manual_seed(1)
    layer = TopKMoE2d(6, 14, 4, 2, num_shared_experts=1, out_dim=7, backend=backend).to(DEVICE)
    x = random_input((2, 6, 3, 5), seed=2)
    run_against_oracle(layer, x, PIXELS, backend)
    assert layer(x).shape == (2, 7, 3, 5)


@pytest.mark.parametrize("backend", backends())
def test_skewed_routing_all_tokens_to_two_experts(backend):
    """Every token picks experts 0 and 1 (the others get no token): their gradients are exactly 0."""
    torch.manual_seed(2)
    layer = TopKMoE(10, 12, 5, 2, backend=backend).to(DEVICE)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 3.0, 2.0
        x = random_input((11, 10), seed=3).detach()
        x[:, 0] = x[:, 0].abs() + 1  # logits 3*x0 > 2*x0 > 0 = the others
    chosen = run_against_oracle(layer, x.requires_grad_(), TOKENS, backend)
    assert all(c == [0, 1] for c in chosen)
    assert layer.last_routing.expert_counts().tolist() == [11, 11, 0, 0, 0]
    assert (layer.experts.w1.grad[2:] == 0).all() and (layer.experts.w2.grad[2:] == 0).all()


def test_autocast_runs_experts_in_the_autocast_dtype():
    """Under bfloat16 autocast the layer runs (x, w1, w2 cast to one dtype) and stays within the
    bfloat16 tolerance of the float64 oracle. Router logits are kept far apart so that bfloat16
    rounding cannot change the expert choice."""
    torch.manual_seed(3)
    layer = TopKMoE(8, 16, 4, 2, backend="torch").to(DEVICE)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([4.0, 8.0, 12.0, 16.0])
        x = random_input((9, 8), seed=4).detach()
        x[:, 0] = torch.where(x[:, 0] < 0, -1.0, 1.0) * (x[:, 0].abs() + 1)
    y64, *_ = oracle_topk_moe(layer, float64_params(layer), x.double().cpu())
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, y64, torch.bfloat16, what="autocast output")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
def test_from_dense_keeps_the_dense_function(activation, backend):
    torch.manual_seed(4)
    dim, hidden, out_dim = 10, 18, 7
    linear1 = torch.nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden).to(DEVICE)
    linear2 = torch.nn.Linear(hidden, out_dim).to(DEVICE)
    layer = TopKMoE.from_dense(linear1, linear2, 6, 2, activation=activation, num_shared_experts=1,
                               scoring="sigmoid", backend=backend)
    assert (layer.dim, layer.experts.hidden_dim, layer.out_dim, layer.experts.num_experts) == (dim, hidden, out_dim, 6)
    x = random_input((2, 9, dim), seed=5).detach()
    x64 = x.double().cpu()
    dense = activation64(x64 @ linear1.weight.double().cpu().t() + linear1.bias.double().cpu(), activation)
    dense = dense @ linear2.weight.double().cpu().t() + linear2.bias.double().cpu()
    assert_close(layer(x), dense, torch.float32, backend=backend, what="upcycled output")

    noisy = TopKMoE.from_dense(linear1, linear2, 6, 2, noise_std=0.1, activation=activation, backend=backend)
    assert not torch.equal(noisy.experts.w1[0], noisy.experts.w1[1]), "noise_std > 0 must make the copies differ"
    assert torch.equal(noisy.experts.b1[0], linear1.bias), "biases are copied without noise"


@pytest.mark.parametrize("backend", backends())
def test_topk_moe_compiles_without_graph_breaks(backend):
    torch.manual_seed(6)
    layer = TopKMoE(16, 24, 4, 2, num_shared_experts=1, backend=backend).to(DEVICE)
    assert_compiled_layer_matches_eager(layer, random_input((2, 7, 16), seed=7))


def test_empty_input_gives_empty_output_and_zero_losses():
    layer = TopKMoE(6, 8, 3, 2, num_shared_experts=1).to(DEVICE)
    y = layer(torch.zeros(0, 5, 6, device=DEVICE))
    assert y.shape == (0, 5, 6)
    assert layer.aux_loss.item() == 0 and layer.router_z_loss.item() == 0


def test_bad_input_raises_naming_the_argument():
    layer = TopKMoE(6, 8, 3, 2).to(DEVICE)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(4, 5, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(4, 6, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="router logits contain NaN"):
        TopKMoE(6, 8, 3, 2, backend=raising_backends()[-1]).to(DEVICE)(torch.full((2, 6), math.nan, device=DEVICE))
    with pytest.raises(ValueError, match="x must have shape \\[B, C, H, W\\]"):
        TopKMoE2d(6, 8, 3, 2).to(DEVICE)(torch.randn(2, 6, 4, device=DEVICE))
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        TopKMoE(6, 8, 3, 4)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        TopKMoE(6, 8, 3, 0)
    with pytest.raises(ValueError, match="scoring"):
        TopKMoE(6, 8, 3, 1, scoring="softplus")
    with pytest.raises(ValueError, match="activation"):
        TopKMoE(6, 8, 3, 1, activation="tanh")
    with pytest.raises(ValueError, match="num_shared_experts"):
        TopKMoE(6, 8, 3, 1, num_shared_experts=-1)
    with pytest.raises(TypeError, match="hidden_dim must be an int"):
        TopKMoE(6, 8.0, 3, 1)
    with pytest.raises(TypeError, match="linear2 must be a torch.nn.Linear"):
        TopKMoE.from_dense(torch.nn.Linear(6, 8), torch.nn.Conv1d(8, 6, 1), 3, 1)
    with pytest.raises(ValueError, match="linear1 must have 16 outputs"):
        TopKMoE.from_dense(torch.nn.Linear(6, 8), torch.nn.Linear(8, 6), 3, 1, activation="swiglu")
    with pytest.raises(ValueError, match="noise_std"):
        TopKMoE.from_dense(torch.nn.Linear(6, 8), torch.nn.Linear(8, 6), 3, 1, noise_std=-1.0)
    with pytest.raises(ValueError, match="noise_std must be a finite number"):
        TopKMoE.from_dense(torch.nn.Linear(6, 8), torch.nn.Linear(8, 6), 3, 1, noise_std=float("nan"))
    for misspelt in ("Triton", "cuda", "pytorch"):  # refused when the layer is built, not at its first call
        with pytest.raises(ValueError, match=f"backend must be one of .* got '{misspelt}'"):
            TopKMoE(6, 8, 3, 1, backend=misspelt)


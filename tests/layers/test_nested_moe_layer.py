"""NestedMoE and NestedMoE2d against a float64 per-token loop of the two-level math, on every backend here."""
from __future__ import annotations

import math

import pytest
import torch

from moe_restore.layers.nested_moe import NestedMoE, NestedMoE2d
from moe_layer_oracle import (activation64, assert_compiled_layer_matches_eager, assert_gradients_close, expert64,
                              float64_params, random_input, shared64, softmax64, top_indices)
from utils import DEVICE, assert_close, backends, poisoned_allocations, raising_backends


def oracle_nested_moe(layer: NestedMoE, params: dict[str, torch.Tensor], tokens: torch.Tensor,
                      contexts: list[torch.Tensor | None]):
    """(y [T, out_dim], aux_loss, group_probs [T, G], chosen (group, sub-expert) pairs per token) in
    float64, token by token; ``contexts[t]`` is token t's image context (concatenated to the token)."""
    T, G, E = tokens.shape[0], layer.router.num_groups, layer.router.experts_per_group
    kg, ke = layer.router.top_k_groups, layer.router.top_k_experts
    outputs, chosen, group_probs = [], [], []
    group_counts = [0] * G
    sub_counts = [[0] * E for _ in range(G)]
    sub_prob_sums = [torch.zeros(E, dtype=torch.float64) for _ in range(G)]
    for t in range(T):
        u = tokens[t] if contexts[t] is None else torch.cat([tokens[t], contexts[t]])
        gl = params["router.group_router.weight"] @ u + params["router.group_router.bias"]
        el = params["router.expert_router.weight"] @ u + params["router.expert_router.bias"]
        p = softmax64(gl)
        group_probs.append(p)
        groups = top_indices(p, kg)
        q = torch.stack([p[g] for g in groups])
        q = q / q.sum()
        y = shared64(params, tokens[t], layer.experts.activation, layer.out_dim)
        pairs = []
        for q_g, g in zip(q, groups):
            r = softmax64(el[g * E:(g + 1) * E])
            subs = top_indices(r, ke)
            s = torch.stack([r[e] for e in subs])
            s = s / s.sum()
            for s_e, e in zip(s, subs):
                y = y + q_g * s_e * expert64(params, "experts.", g * E + e, tokens[t], layer.experts.activation)
                pairs.append((g, e))
                sub_counts[g][e] += 1
            group_counts[g] += 1
            sub_prob_sums[g] = sub_prob_sums[g] + r
        outputs.append(y)
        chosen.append(pairs)
    mean_p = torch.stack(group_probs).mean(dim=0)
    aux = G * sum(group_counts[g] / (T * kg) * mean_p[g] for g in range(G))
    for g in range(G):
        n_g = group_counts[g]
        if n_g:
            inner = E * sum(sub_counts[g][e] / (n_g * ke) * sub_prob_sums[g][e] / n_g for e in range(E))
            aux = aux + n_g / (T * kg) * inner
    return torch.stack(outputs), aux, torch.stack(group_probs), chosen


def tokens_and_contexts(x: torch.Tensor, context: torch.Tensor | None, pixels: bool):
    """Token matrix [T, C], each token's image context, and the map of [T, out] back to x's layout."""
    if pixels:
        B, C, H, W = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(-1, C)
        back = lambda y: y.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # noqa: E731
        per_image = H * W
    else:
        tokens = x.reshape(-1, x.shape[-1])
        back = lambda y: y.reshape(*x.shape[:-1], -1)  # noqa: E731
        per_image = tokens.shape[0] // x.shape[0]
    contexts = [None if context is None else context[t // per_image] for t in range(tokens.shape[0])]
    return tokens, contexts, back


def run_against_oracle(layer: NestedMoE, x: torch.Tensor, context: torch.Tensor | None, backend: str):
    """Forward and backward of (y * g).sum() + aux_loss (outputs poisoned) against the oracle:
    output, aux_loss, group_probs, the chosen experts and every gradient. Returns the oracle's choices."""
    pixels = isinstance(layer, NestedMoE2d)
    params = float64_params(layer)
    x64 = x.detach().double().cpu().requires_grad_()
    c64 = None if context is None else context.detach().double().cpu().requires_grad_()
    tokens, contexts, back = tokens_and_contexts(x64, c64, pixels)
    y64, aux64, probs64, chosen = oracle_nested_moe(layer, params, tokens, contexts)
    y64 = back(y64)
    g = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ((y64 * g).sum() + aux64).backward()

    with poisoned_allocations():
        y = layer(x, context)
        ((y * g.to(y)).sum() + layer.aux_loss).backward()
    assert_close(y, y64, x.dtype, backend=backend, what="output")
    assert_close(layer.aux_loss, aux64, torch.float32, backend=backend, what="aux_loss")
    G = layer.router.num_groups
    expected_probs_shape = (x.shape[0], *x.shape[2:], G) if pixels else (*x.shape[:-1], G)
    assert layer.group_probs.shape == expected_probs_shape
    assert_close(layer.group_probs.reshape(-1, G), probs64, torch.float32, backend=backend,
                 what="group_probs")
    E = layer.router.experts_per_group
    assert layer.last_routing.experts.tolist() == [[g * E + e for g, e in pairs] for pairs in chosen]
    assert_gradients_close(layer, params, x, x64, backend)
    if context is not None:
        assert_close(context.grad, c64.grad, context.dtype, backend=backend, what="grad group_context")
    return chosen


# (input shape, layer arguments, context?): G in {1, 3, 5}, E in {1, 2, 4}, k_g in {1, 2, G},
# k_e in {1, 2, E}, each activation, shared experts, odd widths, out_dim != dim.
CASES = [
    ((3, 5, 12), dict(dim=12, hidden_dim=20, num_groups=3, experts_per_group=2, top_k_groups=2,
                      top_k_experts=1), False),
    ((2, 4, 10), dict(dim=10, hidden_dim=14, num_groups=5, experts_per_group=4, top_k_groups=5,
                      top_k_experts=2, activation="silu", num_shared_experts=1, group_context_dim=3,
                      out_dim=7), True),
    ((7, 9), dict(dim=9, hidden_dim=11, num_groups=1, experts_per_group=1, top_k_groups=1, top_k_experts=1,
                  activation="swiglu", bias=False), False),
    ((1, 13), dict(dim=13, hidden_dim=6, num_groups=3, experts_per_group=4, top_k_groups=1, top_k_experts=4,
                   activation="relu", num_shared_experts=2), False),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape,args,with_context", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_nested_moe_matches_oracle(shape, args, with_context, backend):
    torch.manual_seed(0)
    layer = NestedMoE(**args, backend=backend).to(DEVICE)
    context = random_input((shape[0], args["group_context_dim"]), seed=7) if with_context else None
    run_against_oracle(layer, random_input(shape), context, backend)


@pytest.mark.parametrize("backend", backends())
def test_nested_moe_2d_broadcasts_the_context_per_image(backend):
    """[B, C, H, W] pixels, each image with its own context; the oracle concatenates each pixel's
    token with its image's context. Swapping the contexts of the images changes the output."""
    torch.manual_seed(1)
    layer = NestedMoE2d(6, 10, 3, 4, 2, 2, group_context_dim=5, num_shared_experts=1, backend=backend).to(DEVICE)
    x = random_input((2, 6, 3, 2), seed=2)
    context = random_input((2, 5), seed=3)
    run_against_oracle(layer, x, context, backend)
    with torch.no_grad():
        assert not torch.allclose(layer(x, context), layer(x, context.flip(0)))


@pytest.mark.parametrize("backend", backends())
def test_a_group_no_token_picks(backend):
    """The last group's router bias keeps every token out of it: its experts get exact zero
    gradients and it adds nothing to the within-group balance loss."""
    torch.manual_seed(2)
    layer = NestedMoE(8, 12, 3, 2, 2, 2, backend=backend).to(DEVICE)
    with torch.no_grad():
        layer.router.group_router.bias[2] = -30.0
    chosen = run_against_oracle(layer, random_input((2, 9, 8), seed=4), None, backend)
    assert all(g != 2 for pairs in chosen for g, _ in pairs)
    assert (layer.experts.w1.grad[4:] == 0).all() and (layer.experts.w2.grad[4:] == 0).all()


@pytest.mark.parametrize("backend", backends())
def test_from_dense_keeps_the_dense_function(backend):
    torch.manual_seed(3)
    linear1, linear2 = torch.nn.Linear(10, 16).to(DEVICE), torch.nn.Linear(16, 10).to(DEVICE)
    layer = NestedMoE.from_dense(linear1, linear2, 3, 2, 2, 1, group_context_dim=4, num_shared_experts=1,
                                 backend=backend)
    assert layer.experts.w1.shape == (6, 10, 16) and layer.experts.w2.shape == (6, 16, 10)
    x, context = random_input((2, 5, 10), seed=5).detach(), random_input((2, 4), seed=6).detach()
    x64 = x.double().cpu()
    dense = activation64(x64 @ linear1.weight.double().cpu().t() + linear1.bias.double().cpu(), "gelu")
    dense = dense @ linear2.weight.double().cpu().t() + linear2.bias.double().cpu()
    assert_close(layer(x, context), dense, torch.float32, backend=backend, what="upcycled output")


@pytest.mark.parametrize("backend", backends())
def test_nested_moe_compiles_without_graph_breaks(backend):
    torch.manual_seed(4)
    layer = NestedMoE(16, 24, 3, 2, 2, 1, group_context_dim=5, num_shared_experts=1, backend=backend).to(DEVICE)
    assert_compiled_layer_matches_eager(layer, random_input((2, 7, 16), seed=8), random_input((2, 5), seed=9))


def test_bad_input_raises_naming_the_argument():
    layer = NestedMoE(6, 8, 3, 2, 2, 1, group_context_dim=4).to(DEVICE)
    x = torch.randn(2, 5, 6, device=DEVICE)
    with pytest.raises(ValueError, match="group_context \\[B, 4\\] is required"):
        layer(x)
    with pytest.raises(ValueError, match="group_context must have shape"):
        layer(x, torch.randn(3, 4, device=DEVICE))
    with pytest.raises(TypeError, match="group_context must be a floating-point"):
        layer(x, torch.ones(2, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="group_context given"):
        NestedMoE(6, 8, 3, 2, 2, 1).to(DEVICE)(x, torch.randn(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="backend must be one of .* got 'torch '"):
        NestedMoE(6, 8, 3, 2, 2, 1, backend="torch ")
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 7, device=DEVICE), torch.randn(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="nested router logits contain NaN"):
        NestedMoE(6, 8, 3, 2, 2, 1, backend=raising_backends()[-1]).to(DEVICE)(
            torch.full((3, 6), math.nan, device=DEVICE))
    with pytest.raises(ValueError, match="x must have shape \\[B, C, H, W\\]"):
        NestedMoE2d(6, 8, 3, 2, 2, 1).to(DEVICE)(torch.randn(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="top_k_groups must be <= num_groups"):
        NestedMoE(6, 8, 3, 2, 4, 1)
    with pytest.raises(ValueError, match="top_k_experts must be <= experts_per_group"):
        NestedMoE(6, 8, 3, 2, 1, 3)
    with pytest.raises(ValueError, match="experts_per_group must be >= 1"):
        NestedMoE(6, 8, 3, 0, 1, 1)
    with pytest.raises(ValueError, match="group_context_dim"):
        NestedMoE(6, 8, 3, 2, 1, 1, group_context_dim=-2)
    with pytest.raises(ValueError, match="linear1 must have"):
        NestedMoE.from_dense(torch.nn.Linear(6, 9), torch.nn.Linear(8, 6), 3, 2, 1, 1)

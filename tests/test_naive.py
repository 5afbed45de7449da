"""The plain references of ``moe_restore.kernels.naive`` against the tests' own float64 oracles
(the references are what the benchmarks time as their naive baselines and what a reader reads)."""
from __future__ import annotations

import pytest
import torch

from moe_restore.kernels import naive
from moe_restore.kernels.activations import ACTIVATIONS, first_layer_width
from test_gated_scan import VISITS, make_inputs, reference_scan, reference_scan_2d
from test_moe_mlp import oracle_moe_mlp
from test_nested_routing import oracle_nested
from test_routing import oracle_topk
from utils import assert_close


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route(scoring, renormalize):
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    logits[3, 1] = logits[3, 4]  # a tie: the lower index first
    weights, experts = naive.topk_route(logits, 3, scoring=scoring, renormalize=renormalize)
    want_w, want_e = oracle_topk(logits, 3, scoring, renormalize)
    assert torch.equal(experts, want_e)
    assert_close(weights, want_w, torch.float32, what="weights")


@pytest.mark.parametrize("renormalize", [True, False])
def test_nested_route(renormalize):
    gen = torch.Generator().manual_seed(2)
    gl, el = torch.randn(9, 4, generator=gen), torch.randn(9, 4, 3, generator=gen)
    got = naive.nested_route(gl, el, 2, 2, renormalize=renormalize)
    want = oracle_nested(gl.double(), el.double(), 2, 2, renormalize)
    for name, g, w in zip(("weights", "experts", "group_weights", "groups"), got, want):
        if g.is_floating_point():
            assert_close(g, w, torch.float32, what=name)
        else:
            assert torch.equal(g, w), name
    assert [t.shape for t in naive.nested_route(gl[:0], el[:0], 2, 2)] == [(0, 4), (0, 4), (0, 2), (0, 2)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_mlp(activation):
    gen = torch.Generator().manual_seed(3)
    T, D, H, E, D_out = 11, 6, 5, 4, 3
    x = torch.randn(T, D, generator=gen)
    weights, experts = naive.topk_route(torch.randn(T, E, generator=gen), 2)
    cols = first_layer_width(activation, H)
    w1, b1 = torch.randn(E, D, cols, generator=gen) / D ** 0.5, torch.randn(E, cols, generator=gen)
    w2, b2 = torch.randn(E, H, D_out, generator=gen) / H ** 0.5, torch.randn(E, D_out, generator=gen)
    y = naive.moe_mlp(x, weights, experts, w1, w2, b1, b2, activation=activation)
    want = oracle_moe_mlp(x.double(), experts, weights.double(), w1.double(), w2.double(), b1.double(),
                          b2.double(), activation)
    assert_close(y, want, torch.float32, what=f"naive moe_mlp ({activation})")


@pytest.mark.parametrize("reverse", [False, True])
def test_gated_scan(reverse):
    u, f, Bm, Cm, d_skip, z, h0 = make_inputs((2, 13), 5, 3, seed=4)
    out, h = naive.gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse)
    want_out, want_h = reference_scan(u, f, Bm, Cm, d_skip, z, h0, reverse)
    assert_close(out, want_out, torch.float32, what="out")
    assert_close(h, want_h, torch.float32, what="final state")


@pytest.mark.parametrize("visit", list(VISITS))
def test_gated_scan_2d(visit):
    u, f, Bm, Cm, d_skip, z, h0 = make_inputs((2, 3, 4), 5, 2, seed=5)
    order, reverse = VISITS[visit]
    out, h = naive.gated_scan_2d(u, f, Bm, Cm, order=order, reverse=reverse, d_skip=d_skip, z=z, h0=h0)
    want_out, want_h = reference_scan_2d(u, f, Bm, Cm, visit, d_skip, z, h0, return_final_state=True)
    assert_close(out, want_out, torch.float32, what="out")
    assert_close(h, want_h, torch.float32, what="final state")

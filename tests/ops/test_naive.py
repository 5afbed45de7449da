"""The float64 oracle ``moe_restore.kernels.naive`` against what does not depend on it: small cases
computed by hand (with Python's ``math``), mathematical identities (weights that sum to 1, the top-k
as the k largest with ties to the lower index, the recurrence unrolled step by step), torch's own
``nn.functional`` activations and ``nn.Linear`` layers, and finite differences for its gradients.
Every op test compares the backends with this module, so this file is what makes it trustworthy."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_restore.kernels import naive
from moe_restore.kernels.activations import ACTIVATIONS, ActivationSpec, first_layer_width
from utils import VISITS, assert_close, scan_inputs

F64 = torch.float64


def test_stable_top_k_by_hand():
    p = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-math.inf, 2.0, math.inf, 2.0, 1.0]])
    values, indices = naive.stable_top_k(p, 3)
    assert indices.tolist() == [[1, 2, 4], [0, 1, 2], [2, 1, 3]]
    assert values.dtype == F64 and values.tolist() == [[3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [math.inf, 2.0, 2.0]]


def test_stable_top_k_is_the_k_largest_with_ties_to_the_lower_index():
    """Any row (many ties: values drawn from 5 levels): the chosen values are non-increasing, none
    is below an unchosen one, and among equal values the lower indices are taken, in order."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(0, 5, (50, 9), generator=gen).double()
    values, indices = naive.stable_top_k(p, 4)
    for row, vals, idx in zip(p.tolist(), values.tolist(), indices.tolist()):
        assert vals == [row[i] for i in idx] and vals == sorted(vals, reverse=True)
        unchosen = [row[i] for i in range(9) if i not in idx]
        assert min(vals) >= max(unchosen)
        for a, b in zip(idx, idx[1:]):
            assert row[a] > row[b] or a < b, "equal values must come in index order"
        # the smallest chosen value's ties: every entry of it below the last one chosen is chosen
        last = max(i for i in idx if row[i] == vals[-1])
        assert all(i in idx for i in range(last) if row[i] == vals[-1])


@pytest.mark.parametrize("scoring, renormalize, want", [
    # logits [0, log 3, log 2]: softmax p = [1/6, 3/6, 2/6], top 2 = experts 1, 2
    ("softmax", False, [3 / 6, 2 / 6]),
    ("softmax", True, [3 / 5, 2 / 5]),
    # sigmoid p = [1/2, 3/4, 2/3]
    ("sigmoid", False, [3 / 4, 2 / 3]),
    ("sigmoid", True, [(3 / 4) / (3 / 4 + 2 / 3), (2 / 3) / (3 / 4 + 2 / 3)]),
])
def test_topk_route_by_hand(scoring, renormalize, want):
    logits = torch.tensor([[0.0, math.log(3), math.log(2)]], dtype=torch.float32)
    weights, experts = naive.topk_route(logits, 2, scoring=scoring, renormalize=renormalize)
    assert experts.tolist() == [[1, 2]] and weights.dtype == F64
    torch.testing.assert_close(weights, torch.tensor([want], dtype=F64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route_is_the_definition(scoring, renormalize):
    """Experts: the k largest logits, ties to the lower index (a tie planted); weights: p at the
    chosen experts, p = exp(l) / sum exp(l) or 1 / (1 + exp(-l)) written out, divided by their sum
    with ``renormalize`` (which then sums to 1)."""
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    logits[3, 1] = logits[3, 4]
    logits[3, [0, 2, 3, 5]] = -5.0  # experts 1 and 4 tie at the top of row 3
    weights, experts = naive.topk_route(logits, 3, scoring=scoring, renormalize=renormalize)
    l64 = logits.double()
    for t in range(40):
        ranked = sorted(range(6), key=lambda e: (-l64[t, e].item(), e))
        assert experts[t].tolist() == ranked[:3]
    assert experts[3, :2].tolist() == [1, 4]
    p = l64.exp() / l64.exp().sum(-1, keepdim=True) if scoring == "softmax" else 1 / (1 + (-l64).exp())
    want = p.gather(1, experts)
    if renormalize:
        want = want / want.sum(1, keepdim=True)
        torch.testing.assert_close(weights.sum(1), torch.ones(40, dtype=F64), rtol=0, atol=1e-12)
    assert_close(weights, want, F64, what="weights")


def test_topk_route_weights_survive_underflowed_scores():
    """sigmoid(-1000) underflows even in float64, yet two such logits 1 apart have renormalised
    weights e / (e + 1) and 1 / (e + 1); a softmax logit 1e4 below the best has weight exactly 0."""
    weights, experts = naive.topk_route(torch.tensor([[-1001.0, -1000.0, -3000.0]]), 2, scoring="sigmoid")
    assert experts.tolist() == [[1, 0]]
    e = math.e
    torch.testing.assert_close(weights, torch.tensor([[e / (e + 1), 1 / (e + 1)]], dtype=F64), rtol=1e-12, atol=0)
    weights, experts = naive.topk_route(torch.tensor([[0.0, -1e4, 5.0]]), 3, renormalize=False)
    assert experts.tolist() == [[2, 0, 1]] and weights[0, 2] == 0
    assert abs(weights[0, 0].item() - 1 / (1 + math.exp(-5))) < 1e-12


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route_gradient_is_the_finite_difference(scoring, renormalize):
    """The backward passes are checked against the oracle's autograd; that autograd is checked here
    against central differences (the choice does not move: logits well apart)."""
    logits = (torch.randperm(7, generator=torch.Generator().manual_seed(2)).double() * 0.7).view(1, 7)
    logits = torch.cat([logits, logits.flip(1) - 1.0]).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: naive.topk_route(l, 3, scoring=scoring, renormalize=renormalize)[0],
                                    (logits,))


def test_nested_route_by_hand():
    """Ties to the lower index at both levels; a token with all-zero logits spreads its weight
    evenly: q = 1/2 per group, s = 1/2 per sub-expert."""
    gl = torch.tensor([[0.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    el = torch.zeros(2, 4, 4)
    el[0, 1] = torch.tensor([2.0, 2.0, 2.0, 0.0])
    el[0, 2] = torch.tensor([0.0, 3.0, 3.0, 3.0])
    weights, experts, q, groups = naive.nested_route(gl, el, 2, 2)
    assert groups.tolist() == [[1, 2], [0, 1]]
    assert experts.tolist() == [[4, 5, 9, 10], [0, 1, 4, 5]]
    assert weights[1].tolist() == [0.25] * 4 and q.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert [t.shape for t in naive.nested_route(gl[:0], el[:0], 2, 2)] == [(0, 4), (0, 4), (0, 2), (0, 2)]


@pytest.mark.parametrize("renormalize", [True, False])
def test_nested_route_is_the_two_level_definition(renormalize):
    """Token by token: the groups are the top-k of the group logits with weights q, and inside each
    chosen group g the sub-experts the top-k of its logits, expert g*E + e with weight q_g * s_e|g
    (p and s written out as exp / sum exp); with ``renormalize`` q and each group's s sum to 1."""
    gen = torch.Generator().manual_seed(2)
    T, G, E = 9, 4, 3
    gl, el = torch.randn(T, G, generator=gen), torch.randn(T, G, E, generator=gen)
    weights, experts, q, groups = naive.nested_route(gl, el, 2, 2, renormalize=renormalize)
    assert weights.shape == experts.shape == (T, 4) and q.shape == groups.shape == (T, 2)
    softmax = lambda v: v.exp() / v.exp().sum()  # noqa: E731
    for t in range(T):
        p = softmax(gl[t].double())
        want_groups = sorted(range(G), key=lambda g: (-p[g].item(), g))[:2]
        assert groups[t].tolist() == want_groups
        want_q = p[want_groups] / (p[want_groups].sum() if renormalize else 1.0)
        torch.testing.assert_close(q[t], want_q, rtol=1e-12, atol=0)
        for i, g in enumerate(want_groups):
            s = softmax(el[t, g].double())
            subs = sorted(range(E), key=lambda e: (-s[e].item(), e))[:2]
            assert experts[t, 2 * i:2 * i + 2].tolist() == [g * E + e for e in subs]
            want_s = s[subs] / (s[subs].sum() if renormalize else 1.0)
            torch.testing.assert_close(weights[t, 2 * i:2 * i + 2], want_q[i] * want_s, rtol=1e-12, atol=0)
    if renormalize:
        torch.testing.assert_close(weights.sum(1), torch.ones(T, dtype=F64), rtol=0, atol=1e-12)
    # Flat [T, G*E] expert logits are the same routing.
    assert all(torch.equal(a, b) for a, b in zip(naive.nested_route(gl, el.reshape(T, G * E), 2, 2,
                                                                    renormalize=renormalize),
                                                 (weights, experts, q, groups)))


def test_dispatch_by_hand():
    """Assignments a = t*k + j listed expert by expert (a repeated expert in a row too)."""
    experts = torch.tensor([[2, 2, 0], [1, 2, 1], [0, 0, 0]])
    assert naive.dispatch(experts, 4) == ([2, 6, 7, 8, 3, 5, 0, 1, 4], [0, 4, 6, 9, 9])
    assert naive.dispatch(torch.zeros(0, 2, dtype=torch.long), 3) == ([], [0, 0, 0, 0])


# Each activation with torch's own functions (independent of naive's formulas from the definitions).
TORCH_ACTIVATIONS = {
    "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu, "relu": F.relu,
    "relu2": lambda z: F.relu(z) ** 2,
    "swiglu": lambda z: F.silu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1],
    "geglu": lambda z: F.gelu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1],
    "geglu_tanh": lambda z: F.gelu(z.chunk(2, -1)[0], approximate="tanh") * z.chunk(2, -1)[1],
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_is_two_linear_layers(activation):
    """expert_mlp(u) = Linear2(act(Linear1(u))) with nn.Linear layers holding the expert's weights
    (w1 [D, H'] is the transpose of Linear's [H', D]) and torch.nn.functional's activation."""
    gen = torch.Generator().manual_seed(3)
    D, H, D_out = 6, 5, 3
    cols = first_layer_width(activation, H)
    first, second = torch.nn.Linear(D, cols, dtype=F64), torch.nn.Linear(H, D_out, dtype=F64)
    u = torch.randn(7, D, generator=gen, dtype=F64)
    got = naive.expert_mlp(u, first.weight.T, first.bias, second.weight.T, second.bias, activation)
    with torch.no_grad():
        want = second(TORCH_ACTIVATIONS[activation](first(u)))
    assert_close(got, want, F64, what=activation)


def _scalar_act(spec: ActivationSpec, gate: float, up: float) -> float:
    """One gated unit with Python floats: c_a(f(c_g(gate))) * (s_u(clamp(up)) + up_offset)."""
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    if spec.limit is not None and not spec.clamp_after:
        gate = min(gate, spec.limit)
    if spec.gate_softcap is not None:
        f = spec.gate_softcap * math.tanh(gate / spec.gate_softcap) * sigmoid(spec.alpha * gate)
    elif spec.kind == "swiglu":
        f = gate * sigmoid(spec.alpha * gate)
    else:
        f = 0.5 * gate * (1 + math.erf(gate / math.sqrt(2)))
    if spec.limit is not None:
        f = min(f, spec.limit) if spec.clamp_after else f
        up = max(-spec.limit, min(up, spec.limit))
    if spec.up_softcap is not None:
        up = spec.up_softcap * math.tanh(up / spec.up_softcap)
    return f * (up + spec.up_offset)


@pytest.mark.parametrize("spec", [
    ActivationSpec("swiglu", limit=0.6, alpha=1.702, up_offset=1.0, interleaved=True),  # GPT-OSS
    ActivationSpec("swiglu", limit=0.5),
    ActivationSpec("swiglu", limit=0.2, clamp_after=True),
    ActivationSpec("swiglu", gate_softcap=0.7, up_softcap=0.4),  # Inkling-2
    ActivationSpec("geglu", up_softcap=0.5, up_offset=-0.25),
], ids=str)
def test_activate_gated_specs_by_hand(spec):
    """Each parameter of a gated spec on values that cross its clamps and bend its softcaps, unit by
    unit with Python's math; the gate and up columns taken as halves or interleaved."""
    gate, up = [2.0, -1.5, 0.3, 0.05], [-3.0, 0.1, 0.9, -0.4]
    z = torch.tensor([[v for pair in zip(gate, up) for v in pair]] if spec.interleaved else [gate + up])
    want = torch.tensor([[_scalar_act(spec, g, u) for g, u in zip(gate, up)]], dtype=F64)
    torch.testing.assert_close(naive.activate(z, spec), want, rtol=1e-6, atol=1e-7)  # z is float32


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_moe_mlp_is_the_weighted_sum_of_each_tokens_experts(activation):
    """y[t] = sum_j weights[t, j] * expert_mlp(x[t]) of expert experts[t, j], token by token, with an
    expert that no token chooses; the gradients are those of finite differences."""
    gen = torch.Generator().manual_seed(3)
    T, D, H, E, D_out = 11, 6, 5, 4, 3
    x = torch.randn(T, D, generator=gen, dtype=F64)
    experts = torch.stack([torch.randperm(E - 1, generator=gen)[:2] for _ in range(T)])  # expert E-1: no token
    weights = torch.rand(T, 2, generator=gen, dtype=F64)
    cols = first_layer_width(activation, H)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=F64)  # noqa: E731
    w1, b1 = rand(E, D, cols) / D ** 0.5, rand(E, cols)
    w2, b2 = rand(E, H, D_out) / H ** 0.5, rand(E, D_out)
    y = naive.moe_mlp(x, weights, experts, w1, w2, b1, b2, activation=activation)
    for t in range(T):
        want = sum(weights[t, j] * naive.expert_mlp(x[t:t + 1], w1[e], b1[e], w2[e], b2[e], activation)[0]
                   for j, e in enumerate(experts[t].tolist()))
        torch.testing.assert_close(y[t], want, rtol=1e-12, atol=1e-12)
    params = [t.clone().requires_grad_() for t in (x[:3], weights[:3], w1, w2, b1, b2)]
    assert torch.autograd.gradcheck(lambda x, w, w1, w2, b1, b2: naive.moe_mlp(x, w, experts[:3], w1, w2, b1, b2,
                                                                               activation=activation), params)


def test_gated_scan_is_its_recurrence_unrolled():
    """Three tokens by hand, forward and reverse, from h0, with d_skip and z:
    h_t = a_t h_{t-1} + (1 - a_t) u_t Bm_t^T, out_t = (h_t Cm_t + d u_t) sigmoid(z_t)."""
    u, f, Bm, Cm, d, z, h0 = (t.double() for t in scan_inputs((2, 3), 4, 2, seed=4))
    a = torch.sigmoid(f)
    write = lambda t: ((1 - a[:, t]) * u[:, t])[:, :, None] * Bm[:, t, None, :]  # noqa: E731
    read = lambda h, t: ((h * Cm[:, t, None, :]).sum(-1) + d * u[:, t]) * torch.sigmoid(z[:, t])  # noqa: E731
    h1 = a[:, 0, :, None] * h0 + write(0)
    h2 = a[:, 1, :, None] * h1 + write(1)
    h3 = a[:, 2, :, None] * h2 + write(2)
    out, h = naive.gated_scan(u, f, Bm, Cm, d_skip=d, z=z, h0=h0)
    assert_close(out, torch.stack([read(h1, 0), read(h2, 1), read(h3, 2)], 1), F64, what="out")
    assert_close(h, h3, F64, what="final state")
    g2 = a[:, 2, :, None] * h0 + write(2)
    g1 = a[:, 1, :, None] * g2 + write(1)
    g0 = a[:, 0, :, None] * g1 + write(0)
    out, h = naive.gated_scan(u, f, Bm, Cm, d_skip=d, z=z, h0=h0, reverse=True)
    assert_close(out, torch.stack([read(g0, 0), read(g1, 1), read(g2, 2)], 1), F64, what="reverse out")
    assert_close(h, g0, F64, what="reverse final state")


def test_gated_scan_keeps_a_suppressed_tokens_write():
    """f = 40: 1 - a = 1 / (1 + e^40) ~ 4e-18, which 1 - sigmoid(40) loses in float64; one token
    from h = 0 gives out = (1 - a) u B C exactly."""
    one = torch.ones(1, 1, 1, dtype=F64)
    out, h = naive.gated_scan(3 * one, 40 * one, 2 * one, 5 * one)
    want = 30 / (1 + math.exp(40))
    assert abs(out.item() - want) <= 1e-15 * want and abs(h.item() - want / 5) <= 1e-15 * want


def test_gated_scan_gradient_is_the_finite_difference():
    inputs = [t.double().requires_grad_() for t in scan_inputs((1, 5), 2, 2, seed=6)]
    assert torch.autograd.gradcheck(lambda u, f, Bm, Cm, d, z, h0: naive.gated_scan(u, f, Bm, Cm, d_skip=d, z=z, h0=h0),
                                    inputs)


@pytest.mark.parametrize("visit", list(VISITS))
def test_gated_scan_2d_is_the_1d_scan_of_the_visit_sequence(visit):
    """A row visit scans the grid flattened row-major, a column visit the transposed grid flattened;
    reverse scans that sequence backwards; each output lands back at its cell."""
    u, f, Bm, Cm, d_skip, z, h0 = scan_inputs((2, 3, 4), 5, 2, seed=5)
    order, reverse = VISITS[visit]
    out, h = naive.gated_scan_2d(u, f, Bm, Cm, order=order, reverse=reverse, d_skip=d_skip, z=z, h0=h0)
    B, H, W, _ = u.shape
    if order == "row":
        to_seq = lambda t: t.reshape(B, H * W, -1)  # noqa: E731
    else:
        to_seq = lambda t: t.transpose(1, 2).reshape(B, W * H, -1)  # noqa: E731
    seq_out, want_h = naive.gated_scan(*(to_seq(t) for t in (u, f, Bm, Cm)), d_skip=d_skip, z=to_seq(z), h0=h0,
                                       reverse=reverse)
    want = seq_out.reshape(B, H, W, -1) if order == "row" else seq_out.reshape(B, W, H, -1).transpose(1, 2)
    assert torch.equal(out, want) and torch.equal(h, want_h)
    assert naive.visit_order(H, W, order)[:2] == ([(0, 0), (0, 1)] if order == "row" else [(0, 0), (1, 0)])

"""nested_route against the float64 oracle of issue 3's math (``naive.nested_route``), on every backend
runnable here."""
from __future__ import annotations

import math

import pytest
import torch

from moe_restore.kernels import moe_mlp, naive
from moe_restore.kernels.nested_routing import nested_route
from utils import DEVICE, assert_close, backends, poisoned_allocations, raising_backends, tolerance


def check_dispatch(r, want_experts: torch.Tensor, num_experts: int, backend: str) -> None:
    """Offsets count each expert's assignments; sorted_assignments lists them expert by expert,
    in assignment order inside an expert (``naive.dispatch`` of the oracle's experts)."""
    want_order, want_offsets = naive.dispatch(want_experts, num_experts)
    assert r.expert_offsets.dtype == torch.int64 and r.sorted_assignments.dtype == torch.int64
    assert r.expert_offsets.tolist() == want_offsets
    assert r.sorted_assignments.tolist() == want_order


def random_logits(T: int, G: int, E: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gl = (2 * torch.randn(T, G, generator=gen, dtype=torch.float64)).to(dtype)
    el = (2 * torch.randn(T, G, E, generator=gen, dtype=torch.float64)).to(dtype)
    return gl, el


def check_against_oracle(gl, el, k_g, k_e, renormalize, backend, dtype=torch.float32, seed=0):
    """Forward (ids exactly, weights to tolerance, dispatch) and the gradients to both logits of
    a random linear loss of weights and group_weights, against the oracle's float64 autograd."""
    T, G, E = el.shape
    gl_dev, el_dev = gl.to(DEVICE).requires_grad_(), el.to(DEVICE).requires_grad_()
    with poisoned_allocations():
        r = nested_route(gl_dev, el_dev, k_g, k_e, renormalize=renormalize, backend=backend)
        gl64, el64 = gl.double().requires_grad_(), el.double().requires_grad_()
        want_w, want_e, want_q, want_g = naive.nested_route(gl64, el64, k_g, k_e, renormalize=renormalize)
        assert r.num_experts == G * E and r.experts.shape == (T, k_g * k_e)
        assert r.weights.dtype == torch.float32 and r.group_weights.dtype == torch.float32
        assert r.groups.dtype == torch.int64 and r.experts.dtype == torch.int64
        assert torch.equal(r.groups.cpu(), want_g), "groups"
        assert torch.equal(r.experts.cpu(), want_e), "experts"
        assert_close(r.weights, want_w, dtype, backend=backend, what="weights")
        assert_close(r.group_weights, want_q, dtype, backend=backend, what="group_weights")
        check_dispatch(r, want_e, G * E, backend)
        gen = torch.Generator().manual_seed(seed + 1)
        cw = torch.randn(T, k_g * k_e, generator=gen, dtype=torch.float64)
        cq = torch.randn(T, k_g, generator=gen, dtype=torch.float64)
        loss = (r.weights * cw.float().to(DEVICE)).sum() + (r.group_weights * cq.float().to(DEVICE)).sum()
        dgl, del_ = torch.autograd.grad(loss, (gl_dev, el_dev))
    want_dgl, want_del = torch.autograd.grad((want_w * cw.float().double()).sum()
                                             + (want_q * cq.float().double()).sum(), (gl64, el64))
    assert dgl.dtype == gl.dtype and del_.dtype == el.dtype
    # With one group (p = 1), or one chosen group renormalised (q = 1), the weights do not depend
    # on group_logits: the gradient is exactly zero, where a relative error means nothing; it must
    # then be zero to rounding at the scale of the cotangents. Likewise one level down.
    scale = max(cw.abs().max().item(), cq.abs().max().item())
    for got, want, is_zero, name in ((dgl, want_dgl, G == 1 or (k_g == 1 and renormalize), "group_logits"),
                                     (del_, want_del, E == 1 or (k_e == 1 and renormalize), "expert_logits")):
        if is_zero:
            assert got.abs().max().item() <= tolerance(dtype, backend=backend) * scale, f"d {name} is not 0"
        else:
            assert_close(got, want, dtype, backend=backend, what=f"d {name}")
    return r, del_


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("used", ["weights", "group_weights"])
def test_gradient_from_one_of_the_two_weights(backend, used):
    """A loss that reads only the weights, or only the group weights: the unused one gets no
    gradient from autograd (the Triton op takes it as zero), and both logits' gradients match
    the oracle's float64 autograd of the same loss."""
    T, G, k_g, E, k_e = 19, 5, 2, 4, 2
    gl, el = random_logits(T, G, E, seed=31)
    gl_dev, el_dev = gl.to(DEVICE).requires_grad_(), el.to(DEVICE).requires_grad_()
    gl64, el64 = gl.double().requires_grad_(), el.double().requires_grad_()
    want_w, _, want_q, _ = naive.nested_route(gl64, el64, k_g, k_e, renormalize=True)
    r = nested_route(gl_dev, el_dev, k_g, k_e, renormalize=True, backend=backend)
    got, want = (r.weights, want_w) if used == "weights" else (r.group_weights, want_q)
    c = torch.randn(got.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((got * c.float().to(DEVICE)).sum(), (gl_dev, el_dev), allow_unused=True)
    want_grads = torch.autograd.grad((want * c).sum(), (gl64, el64), allow_unused=True)
    for name, g, w in zip(("group_logits", "expert_logits"), grads, want_grads):
        w = torch.zeros_like(el64 if name == "expert_logits" else gl64) if w is None else w
        g = torch.zeros_like(w) if g is None else g
        assert_close(g, w, torch.float32, backend=backend, what=f"d {name}")


def k_choices(n: int) -> list[int]:
    return sorted({1, min(2, n), n})


GRID = [(G, k_g, E, k_e) for G in (1, 3, 5) for k_g in k_choices(G) for E in (1, 2, 4) for k_e in k_choices(E)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("G,k_g,E,k_e", GRID)
def test_matches_oracle_on_the_issue_grid(backend, renormalize, G, k_g, E, k_e):
    gl, el = random_logits(7, G, E, seed=100 * G + 10 * E + k_g * 3 + k_e)
    check_against_oracle(gl, el, k_g, k_e, renormalize, backend)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("T,G,k_g,E,k_e,renormalize", [
    (257, 5, 2, 4, 1, True),    # the benchmark's transformer-scale shape
    (257, 5, 2, 4, 2, False),   # the benchmark's pixel-token shape
    (257, 3, 3, 2, 2, True),    # dense at both levels
    (257, 1, 1, 1, 1, False),
    (1, 5, 5, 4, 4, False),
    (1, 3, 2, 2, 1, True),
])
def test_matches_oracle_long_and_single_token(backend, T, G, k_g, E, k_e, renormalize):
    gl, el = random_logits(T, G, E, seed=T + G + E)
    check_against_oracle(gl, el, k_g, k_e, renormalize, backend)


@pytest.mark.parametrize("backend", backends())
def test_float16_logits(backend):
    gl, el = random_logits(33, 5, 4, seed=7, dtype=torch.float16)
    check_against_oracle(gl, el, 2, 2, True, backend, dtype=torch.float16)


@pytest.mark.parametrize("backend", backends())
def test_group_no_token_picks(backend):
    gl, el = random_logits(40, 5, 3, seed=11)
    gl[:, 2] = -30.0  # group 2 never makes the top 2
    r, del_ = check_against_oracle(gl, el, 2, 2, True, backend)
    counts = r.expert_offsets.diff().cpu()
    assert (counts[6:9] == 0).all() and counts.sum() == 40 * 4
    assert (r.groups != 2).all()
    assert (del_[:, 2] == 0).all(), "an unchosen group's expert logits must get exactly zero gradient"


@pytest.mark.parametrize("backend", backends())
def test_ties_go_to_the_lower_index(backend):
    gl = torch.tensor([[0.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    el = torch.zeros(2, 4, 4)
    el[0, 1] = torch.tensor([2.0, 2.0, 2.0, 0.0])
    el[0, 2] = torch.tensor([0.0, 3.0, 3.0, 3.0])
    r, _ = check_against_oracle(gl, el, 2, 2, True, backend)
    assert r.groups.tolist() == [[1, 2], [0, 1]]
    assert r.experts.tolist() == [[4, 5, 9, 10], [0, 1, 4, 5]]
    assert r.weights[1].tolist() == [0.25] * 4


@pytest.mark.parametrize("backend", backends())
def test_flat_expert_logits_match_the_3d_layout(backend):
    gl, el = random_logits(9, 3, 4, seed=5)
    flat = el.reshape(9, 12).to(DEVICE).requires_grad_()
    r = nested_route(gl.to(DEVICE), flat, 2, 2, backend=backend)
    want_w, want_e, _, _ = naive.nested_route(gl.double(), el.double(), 2, 2)
    assert torch.equal(r.experts.cpu(), want_e)
    assert_close(r.weights, want_w, torch.float32, backend=backend, what="weights")
    (grad,) = torch.autograd.grad(r.weights[:, 0].sum(), flat)
    assert grad.shape == (9, 12)


@pytest.mark.parametrize("backend", backends())
def test_strided_logits(backend):
    gl, el = random_logits(8, 3, 5, seed=9)
    gl_t = gl.t().contiguous().t()                       # column-major group logits
    el_sliced = torch.cat([el, el], dim=2)[:, :, ::2]   # non-unit sub-expert stride
    r = nested_route(gl_t.to(DEVICE), el_sliced.to(DEVICE), 2, 3, backend=backend)
    want_w, want_e, _, _ = naive.nested_route(gl.double(), el_sliced.double(), 2, 3)
    assert torch.equal(r.experts.cpu(), want_e)
    assert_close(r.weights, want_w, torch.float32, backend=backend, what="weights")


@pytest.mark.parametrize("backend", backends())
def test_no_tokens(backend):
    gl = torch.zeros(0, 3, device=DEVICE, requires_grad=True)
    el = torch.zeros(0, 3, 2, device=DEVICE, requires_grad=True)
    r = nested_route(gl, el, 2, 1, backend=backend)
    assert r.weights.shape == (0, 2) and r.group_weights.shape == (0, 2) and r.groups.shape == (0, 2)
    assert r.expert_offsets.tolist() == [0] * 7
    dgl, del_ = torch.autograd.grad(r.weights.sum() + r.group_weights.sum(), (gl, el))
    assert dgl.shape == (0, 3) and del_.shape == (0, 3, 2)


def poke(tensor: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", raising_backends())
@pytest.mark.parametrize("where", ["group logit NaN", "group logit +inf", "chosen group's expert logit NaN",
                                   "unchosen group's expert logit NaN", "chosen group all -inf"])
def test_undefined_scores_raise(backend, where):
    gl, el = random_logits(6, 4, 3, seed=3)
    gl[4] = torch.tensor([5.0, 4.0, -5.0, -6.0])  # token 4 picks groups 0 and 1
    gl, el = {
        "group logit NaN": (poke(gl, (4, 2), math.nan), el),
        "group logit +inf": (poke(gl, (4, 3), math.inf), el),
        "chosen group's expert logit NaN": (gl, poke(el, (4, 1, 2), math.nan)),
        "unchosen group's expert logit NaN": (gl, poke(el, (4, 3, 0), math.nan)),
        "chosen group all -inf": (gl, poke(el, (4, 0), -math.inf)),
    }[where]
    with pytest.raises(ValueError, match="NaN"):
        nested_route(gl.to(DEVICE), el.to(DEVICE), 2, 2, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_unchosen_group_is_never_scored(backend):
    gl, el = random_logits(6, 4, 3, seed=3)
    gl[:, 3] = -30.0
    el[:, 3] = -math.inf  # its softmax would be undefined, but no token chooses group 3
    r = nested_route(gl.to(DEVICE), el.to(DEVICE), 2, 2, backend=backend)
    want_w, want_e, _, _ = naive.nested_route(gl.double(), el.double(), 2, 2)
    assert torch.equal(r.experts.cpu(), want_e)
    assert_close(r.weights, want_w, torch.float32, backend=backend, what="weights")


@pytest.mark.parametrize("args,error,message", [
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2), 4, 1), ValueError, "k_groups"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2), 1, 3), ValueError, "k_experts"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2), 0, 1), ValueError, "k_groups"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2), 1, 0), ValueError, "k_experts"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2), 1.0, 1), TypeError, "k_groups"),
    ((torch.zeros(4, 3), torch.zeros(4, 2, 2), 1, 1), ValueError, "expert_logits"),   # G mismatch
    ((torch.zeros(4, 3), torch.zeros(5, 3, 2), 1, 1), ValueError, "expert_logits"),   # T mismatch
    ((torch.zeros(4, 3), torch.zeros(4, 7), 1, 1), ValueError, "expert_logits"),      # not G*E columns
    ((torch.zeros(4, 3), torch.zeros(4, 3, 0), 1, 1), ValueError, "expert_logits"),
    ((torch.zeros(4, 3, 1), torch.zeros(4, 3, 2), 1, 1), ValueError, "group_logits"),
    ((torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3, 2), 1, 1), TypeError, "group_logits"),
    ((torch.zeros(4, 3), [[0.0]], 1, 1), TypeError, "expert_logits"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, 2, device="meta"), 1, 1), ValueError, "one device"),
])
def test_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        nested_route(*args, backend="torch")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        nested_route(torch.zeros(2, 2), torch.zeros(2, 2, 2), 1, 1, backend="cuda")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("T,G,k_g,E,k_e", [(7, 3, 2, 2, 2), (13, 5, 2, 4, 2)])
def test_nested_route_with_moe_mlp_is_the_nested_moe(backend, T, G, k_g, E, k_e):
    D, H, D_out = 5, 7, 3
    gen = torch.Generator().manual_seed(T * G)
    x64, w1_64, b1_64, w2_64, b2_64, cotangent = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        for shape, scale in (((T, D), 1), ((G * E, D, H), 0.5), ((G * E, H), 0.5), ((G * E, H, D_out), 0.5),
                             ((G * E, D_out), 0.5), ((T, D_out), 1)))
    gl, el = random_logits(T, G, E, seed=T + E)
    params64 = [p.requires_grad_() for p in (x64, gl.double(), el.double(), w1_64, b1_64, w2_64, b2_64)]
    params = [p.detach().float().to(DEVICE).requires_grad_() for p in params64]
    x, gl32, el32, w1, b1, w2, b2 = params
    with poisoned_allocations():
        routing = nested_route(gl32, el32, k_g, k_e, backend=backend)
        y = moe_mlp(x, routing, w1, w2, b1, b2, activation="gelu", backend=backend)
        grads = torch.autograd.grad((y * cotangent.float().to(DEVICE)).sum(), params)
    x64, gl64, el64, w1_64, b1_64, w2_64, b2_64 = params64
    want_w, want_e, _, _ = naive.nested_route(gl64, el64, k_g, k_e)
    want = naive.moe_mlp(x64, want_w, want_e, w1_64, w2_64, b1_64, b2_64, activation="gelu")
    assert_close(y, want, torch.float32, backend=backend, what="y")
    want_grads = torch.autograd.grad((want * cotangent.float().double()).sum(), params64)
    names = ["x", "group_logits", "expert_logits", "w1", "b1", "w2", "b2"]
    for name, got, ref in zip(names, grads, want_grads):
        assert_close(got, ref, torch.float32, backend=backend, what=f"d {name}")

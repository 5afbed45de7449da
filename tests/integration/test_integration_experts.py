"""experts_implementation="moe_restore": on a tiny random model of every family in the installed
transformers whose experts use the hook, logits and every gradient equal transformers' "eager"
experts (float32, <= 1e-5 relative) and moe_mlp really ran; where a family's layout or activation
is not one of moe_mlp's, the call warns and runs what transformers would have run (its
"grouped_mm"), bitwise. Layouts no family of this
release exercises with moe_mlp (biases, transposed storage, ungated experts) are checked on a
decorated test class against transformers' own "batched_mm"."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from packaging.version import Version

tf = pytest.importorskip("transformers")
moe_hook = pytest.importorskip("transformers.integrations.moe")

import moe_restore  # noqa: E402,F401 - registers the implementations
import moe_restore.integration.experts as experts_impl  # noqa: E402
from moe_restore.kernels import moe_mlp, routing_from_topk  # noqa: E402
from hf_tiny_models import (FALLBACK, FALLBACK_RELEASE, NoTinyModel, count_moe_mlp, hook_families, is_hooked,  # noqa: E402,F401 - a fixture
                            logits_and_grads, relative_error, tiny_model)
from utils import backends  # noqa: E402

TOL = 1e-5
# What a call the kernels cannot take runs instead: transformers' default experts implementation.
FALLS_BACK_TO = "grouped_mm" if "grouped_mm" in moe_hook.ALL_EXPERTS_FUNCTIONS else "batched_mm"


def test_registered_names():
    names = set(moe_hook.ALL_EXPERTS_FUNCTIONS)
    assert {"moe_restore", "moe_restore_torch", "moe_restore_triton"} <= names


def test_families_found():
    families = hook_families()
    assert len(families) >= 40 and {"mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"} <= set(families)
    unknown = set(FALLBACK) - set(families)
    if unknown and Version(tf.__version__) < Version(FALLBACK_RELEASE):
        pytest.skip(f"transformers {tf.__version__} is older than the list's {FALLBACK_RELEASE}: "
                    f"{sorted(unknown)} do not use the hook (or do not exist) there yet")
    assert not unknown, f"listed families no longer use the hook: {unknown}"


def _check_family(family: str, implementation: str, calls: list) -> tuple[float, float]:
    try:
        model = tiny_model(family)
    except NoTinyModel as error:  # a family new in the installed transformers: reported, not failed
        pytest.skip(str(error))
    y_ref, g_ref = logits_and_grads(model, "eager")
    experts_impl._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, g = logits_and_grads(model, implementation)
    ours = [str(w.message) for w in caught if "moe_restore" in str(w.message)]
    assert set(g) == set(g_ref)
    if family in FALLBACK:
        assert not calls and len(ours) == 1 and FALLBACK[family] in ours[0], ours
        assert f'"{FALLS_BACK_TO}" experts forward instead' in ours[0], ours
        y_fb, g_fb = logits_and_grads(model, FALLS_BACK_TO)
        assert torch.equal(y, y_fb) and all(torch.equal(g[n], g_fb[n]) for n in g_fb)
        err_y = relative_error(y, y_ref)
        err_g = max(relative_error(g[n], g_ref[n]) for n in g_ref)
        assert err_y <= TOL and err_g <= TOL, (family, err_y, err_g)
        return err_y, err_g
    assert calls and not ours, ours
    err_y = relative_error(y, y_ref)
    err_g = max(relative_error(g[n], g_ref[n]) for n in g_ref)
    assert err_y <= TOL and err_g <= TOL, (family, err_y, err_g)
    return err_y, err_g


@pytest.mark.parametrize("family", hook_families())
def test_family_matches_eager(family, count_moe_mlp):
    _check_family(family, "moe_restore_torch", count_moe_mlp)
    assert set(count_moe_mlp) <= {"torch"}


def _hooked_experts(model):
    return next(m for m in model.modules() if any(is_hooked(c) for c in type(m).__mro__))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", [f for f in hook_families() if f not in FALLBACK])
def test_experts_module_matches_eager_across_the_clamps(family, backend, count_moe_mlp):
    """Each family's experts module alone, eager against ours, forward and the gradients of the
    hidden states, the routing weights and every parameter; the hidden states are scaled so that
    the first layer's outputs cross the activation's clamps (the tiny models' never reach a limit of
    7 or 10)."""
    try:
        model = tiny_model(family)
    except NoTinyModel as error:
        pytest.skip(str(error))
    experts = _hooked_experts(model)
    planned = experts_impl.plan(experts, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    assert not isinstance(planned, str), planned
    spec, (w1, *_) = planned
    E, D = w1.shape[:2]
    gen = torch.Generator().manual_seed(5)
    T, k = 19, 2
    index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen)
    x = torch.randn(T, D, generator=gen)
    limit = getattr(spec, "limit", None) or 3.0
    with torch.no_grad():  # z = x W1 of expert 0 with a spread of 2 * limit
        x *= 2 * limit / (x @ w1[0]).std()
    upstream = torch.randn(T, D, generator=gen)
    params = list(experts.parameters())

    def run(implementation):
        model.set_experts_implementation(implementation)
        xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = experts(xs, index, ws)
        grads = torch.autograd.grad((y * upstream).sum(), [xs, ws, *params], allow_unused=True)
        return (y.detach(), *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, [xs, ws, *params])))

    want = run("eager")
    got = run(f"moe_restore_{backend}")
    assert count_moe_mlp == [backend]
    for name, g, w in zip(["y", "dx", "dweights"] + [n for n, _ in experts.named_parameters()], got, want):
        assert relative_error(g, w) <= TOL, (family, str(spec), name, relative_error(g, w))


@pytest.mark.parametrize("family", ["qwen3_moe", "aria"])
def test_family_matches_eager_triton(family, count_moe_mlp):
    if "triton" not in backends():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    _check_family(family, "moe_restore_triton", count_moe_mlp)
    assert count_moe_mlp and set(count_moe_mlp) == {"triton"}


class _Config:
    """What the hook reads from a config."""

    _experts_implementation = "eager"

    def __init__(self, act: str):
        self.hidden_act = act


def _experts_class(act: str, **layout):
    @moe_hook.use_experts_implementation(**layout)
    class Experts(nn.Module):
        def __init__(self, config, E=3, D=8, H=6):
            super().__init__()
            gated = layout.get("has_gate", True)
            prefix, width = ("gate_up", 2 * H) if gated else ("up", H)
            shape1, shape2 = ((E, D, width), (E, H, D)) if layout.get("is_transposed") else ((E, width, D), (E, D, H))
            setattr(self, f"{prefix}_proj", nn.Parameter(torch.randn(shape1) / D**0.5))
            self.down_proj = nn.Parameter(torch.randn(shape2) / H**0.5)
            if layout.get("has_bias"):
                setattr(self, f"{prefix}_proj_bias", nn.Parameter(torch.randn(E, width) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D) * 0.1)
            self.num_experts = E
            self.act_fn = tf.activations.ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not the reference here")

    return Experts


@pytest.mark.parametrize("act, layout", [
    ("silu", dict(is_transposed=True, has_bias=True)),
    ("silu", dict(has_bias=True)),
    ("gelu", dict(has_gate=False, has_bias=True)),
    ("gelu_pytorch_tanh", dict(has_gate=False, is_transposed=True)),
    ("relu", dict(has_gate=False)),
])
def test_layouts_match_batched_mm(act, layout, count_moe_mlp):
    torch.manual_seed(0)
    config = _Config(act)
    experts = _experts_class(act, **layout)(config)
    x = torch.randn(10, 8, requires_grad=True)
    logits = torch.randn(10, 3, requires_grad=True)

    def run(name):
        config._experts_implementation = name
        for t in (x, logits, *experts.parameters()):
            t.grad = None
        weights, index = logits.softmax(-1).topk(2, dim=-1)
        y = experts(x, index, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [t.grad.clone() for t in (x, logits, *experts.parameters())]

    y_ref, g_ref = run("batched_mm")
    y, g = run("moe_restore_torch")
    assert count_moe_mlp == ["torch"]
    assert relative_error(y, y_ref) <= TOL
    assert all(relative_error(a, b) <= TOL for a, b in zip(g, g_ref))


def _interleaved_experts():
    """A SiLU-gated experts module with interleaved gate/up rows (which moe_mlp does not take),
    whose own eager forward raises, and a call of it (H = 8: torch._grouped_mm on the CPU wants
    16-byte strides)."""
    config = _Config("silu")
    experts = _experts_class("silu", is_concatenated=False)(config, H=8)
    gen = torch.Generator().manual_seed(4)
    x, index = torch.randn(4, 8, generator=gen), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]])
    return config, experts, (x, index, torch.rand(4, 2, generator=gen))


def test_unsupported_warns_once_and_runs_transformers_default(count_moe_mlp):
    config, experts, call = _interleaved_experts()
    config._experts_implementation = FALLS_BACK_TO
    want = experts(*call)
    config._experts_implementation = "moe_restore_torch"
    experts_impl._warned.clear()
    with pytest.warns(UserWarning, match=f'interleaved.*"{FALLS_BACK_TO}" experts forward instead'):
        assert torch.equal(experts(*call), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(experts(*call), want)
    assert not count_moe_mlp


def test_without_grouped_or_batched_mm_falls_back_to_eager(monkeypatch, count_moe_mlp):
    """A transformers whose registry has neither "grouped_mm" nor "batched_mm": the family's own
    eager forward runs (here it raises, which shows it ran)."""
    registry = {k: v for k, v in moe_hook.ExpertsInterface._global_mapping.items() if k not in experts_impl.FALLBACKS}
    monkeypatch.setattr(moe_hook.ExpertsInterface, "_global_mapping", registry)
    config, experts, call = _interleaved_experts()
    config._experts_implementation = "moe_restore_torch"
    experts_impl._warned.clear()
    with pytest.warns(UserWarning, match='"eager" experts forward instead'), \
            pytest.raises(AssertionError, match="eager forward"):
        experts(*call)
    assert not count_moe_mlp


def test_loss_already_holds_the_aux_loss():
    """The README's claim: with labels and output_router_logits, out.loss = LM loss + coef * aux_loss."""
    model = tiny_model("mixtral")
    model.set_experts_implementation("moe_restore_torch")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    lm = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, lm + model.config.router_aux_loss_coef * out.aux_loss)


def _eager_and_ours(model, count):
    """(output, grads) of the model's forward under "eager" and under "moe_restore_torch"."""
    ref = logits_and_grads(model, "eager")
    count.clear()
    ours = logits_and_grads(model, "moe_restore_torch")
    assert count == ["torch"] * 2, count
    return ref, ours


def test_peft_lora_on_experts(count_moe_mlp):
    """LoRA on the experts' 3D Parameters (PEFT target_parameters): the LoRA'd weights reach moe_mlp
    and the adapters' gradients equal eager's."""
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen3_moe")
    config = peft.LoraConfig(r=2, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    lora = peft.get_peft_model(model, config)
    (y_ref, g_ref), (y, g) = _eager_and_ours(lora.base_model.model, count_moe_mlp)
    assert len(g_ref) == 8 and all("lora_" in n for n in g_ref)  # only the adapters train
    assert set(g) == set(g_ref) and relative_error(y, y_ref) <= TOL
    assert all(relative_error(g[n], g_ref[n]) <= TOL for n in g_ref)


def test_accelerate_offload(count_moe_mlp):
    """cpu_offload keeps the weights on the meta device and loads them around each module's
    forward, the experts' included: the hook path reads them inside that forward."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("mixtral")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        want = model(input_ids=torch.arange(16).view(2, 8), use_cache=False).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    model.set_experts_implementation("moe_restore_torch")
    with torch.no_grad():
        got = model(input_ids=torch.arange(16).view(2, 8), use_cache=False).logits
    assert count_moe_mlp == ["torch"] * 2 and relative_error(got, want) <= TOL


@pytest.mark.parametrize("path", ["fold", "repeats"])
@pytest.mark.parametrize("backend", backends())
def test_repeated_and_sentinel_slots_match_the_slot_sum(backend, path):
    """transformers' contract sums every slot: a row may repeat an expert (LongCat-Flash's zero
    experts) or hold a sentinel id >= E (expert parallelism), which contributes nothing. Against
    that sum, written slot by slot in float64: the output and the gradients of x, the weights and
    every slot weight (a sentinel's is 0). ``fold``: through ``distinct_slots``; ``repeats``: the
    torch backend's ``routing_from_topk(repeats=True)``, the repeated slots as they are (no
    sentinels: expert_forward takes that path only where the hook rules them out)."""
    if path == "repeats" and backend != "torch":
        pytest.skip("repeats=True is the torch backend's")
    gen = torch.Generator().manual_seed(3)
    T, D, H, E, k = 7, 5, 6, 4, 3
    ids = torch.tensor([[0, 0, 1], [2, 5, 2], [3, 3, 3], [4, 7, 1], [1, 2, 3], [0, 0, 0], [6, 6, 2]])
    if path == "repeats":
        ids = ids.clamp(max=E - 1)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, D, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(T, D, generator=gen, dtype=torch.float64)

    def slot_sum():
        y = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e = int(ids[t, j])
                if e < E:
                    y[t] += w[t, j] * (torch.nn.functional.gelu(x[t] @ w1[e]) @ w2[e])
        return y

    def ours():
        dtype = torch.float32 if backend == "triton" else torch.float64
        if path == "repeats":
            routing = routing_from_topk(ids, w, E, backend=backend, repeats=True)
        else:
            distinct, weights = experts_impl.distinct_slots(ids, w, E)
            assert ((distinct >= 0) & (distinct < E)).all()
            assert (distinct.sort(-1).values.diff(dim=-1) > 0).all()
            routing = routing_from_topk(distinct, weights, E, backend=backend)
        return moe_mlp(x.to(dtype), routing, w1.to(dtype), w2.to(dtype), activation="gelu",
                       backend=backend).double()

    grads = []
    for run in (slot_sum, ours):
        y = run()
        grads.append((y, *torch.autograd.grad(y, (x, w, w1, w2), dy)))
    tol = 1e-5 if backend == "triton" else 1e-6  # the routing keeps its weights in float32
    for got, want in zip(grads[1], grads[0]):
        assert relative_error(got, want) <= tol
    if path == "fold":
        assert grads[1][2][1, 1] == 0 and grads[1][2][3, 1] == 0  # sentinel slots


@pytest.mark.parametrize("expert_parallel", [False, True, None])
def test_torch_backend_folds_only_where_sentinels_may_come(monkeypatch, expert_parallel):
    """On the torch backend the slots are folded (``distinct_slots``) only where the hook's
    ``_is_expert_parallel`` is not False (True, or absent as in transformers 5.17), and either
    path gives the eager experts' output on repeated slots."""
    experts = _hooked_experts(tiny_model("mixtral"))
    if expert_parallel is None:
        experts.__dict__.pop("_is_expert_parallel", None)
    else:
        experts._is_expert_parallel = expert_parallel
    folds = []
    real = experts_impl.distinct_slots
    monkeypatch.setattr(experts_impl, "distinct_slots", lambda *a: folds.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, experts.gate_up_proj.shape[2], generator=gen)
    index = torch.tensor([[0, 0], [1, 2], [3, 3], [2, 1], [0, 3], [1, 1]]) % experts.gate_up_proj.shape[0]
    weights = torch.rand(6, 2, generator=gen)
    want = experts_impl.eager_forward(experts)(experts, x, index, weights)
    got = experts_impl.experts_forward(experts, x, index, weights, backend="torch")
    assert len(folds) == (0 if expert_parallel is False else 1)
    assert relative_error(got, want) <= TOL


def test_apply_gate_probe_under_torch_compile():
    """The probe that matches a family's _apply_gate to a spec reads its result on the host, so
    under torch.compile (fullgraph) an unprobed class gets a named reason instead of a graph
    break, and a class probed by an eager call before gets its spec inside the compiled graph."""
    experts = _hooked_experts(tiny_model("gpt_oss"))
    x, index, weights = torch.randn(5, 32), torch.tensor([[0, 1]] * 5), torch.rand(5, 2)
    experts_impl._probed.clear()

    def activation(a, b, c):
        planned = experts_impl.plan(experts, a, b, c)
        return planned if isinstance(planned, str) else str(planned[0])

    assert "outside torch.compile" in torch.compile(activation, fullgraph=True)(x, index, weights)
    want = "swiglu(limit=7.0,alpha=1.702,up_offset=1.0,interleaved=True)"
    assert activation(x, index, weights) == want
    torch._dynamo.reset()
    assert torch.compile(activation, fullgraph=True)(x, index, weights) == want

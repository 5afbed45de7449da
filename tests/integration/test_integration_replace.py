"""replace_moe on tiny random transformers models built offline: the replaced model computes what the
original computes (outputs, router logits, aux loss, every gradient), against the original model
run in float64 as the oracle; it shares the original's weights and trains; the report says what
changed and names what it left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import moe_restore.integration.experts as experts_impl
from moe_restore.integration import KernelSparseMoeBlock, replace_moe
from hf_tiny_models import REPLACE_SIZES, lm_loss, replace_model, replace_tokens
from utils import DEVICE, assert_close, backends, poisoned_allocations

tf = pytest.importorskip("transformers")

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_replaced_model_matches_the_original(family, backend):
    model = replace_model(family)
    oracle = copy.deepcopy(model).double()
    oracle.set_experts_implementation("eager")  # the per-expert loop; grouped_mm has no float64
    report = replace_moe(model, backend=backend)
    ids = replace_tokens()
    with poisoned_allocations():
        out, loss = lm_loss(model, ids)
        loss.backward()
    ref, ref_loss = lm_loss(oracle, ids)
    ref_loss.backward()
    assert_close(out.logits, ref.logits, torch.float32, backend=backend, what="logits")
    assert_close(out.aux_loss, ref.aux_loss, torch.float32, backend=backend, what="aux loss")
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for got, want in zip(out.router_logits, ref.router_logits):
        assert got.shape == want.shape == (ids.numel(), want.shape[-1])
        assert_close(got, want, torch.float32, backend=backend, what="router logits")
    params64 = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert_close(p.grad, params64[name].grad, torch.float32, backend=backend, what=f"grad {name}")
    assert [c.name for c in report.replaced] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.skipped == []


def test_replacement_shares_the_weights_and_keeps_the_state_dict(monkeypatch):
    seen = []
    real = experts_impl.moe_mlp_topk

    def moe_mlp_topk(x, experts, weights, w1, w2, *rest, **kwargs):
        seen.append((w1, w2))
        return real(x, experts, weights, w1, w2, *rest, **kwargs)

    monkeypatch.setattr(experts_impl, "moe_mlp_topk", moe_mlp_topk)
    model = replace_model("qwen2_moe")
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = replace_moe(model)
    assert report.model is model
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys
    block = model.model.layers[0].mlp
    assert isinstance(block, KernelSparseMoeBlock)
    model(replace_tokens())
    assert len(seen) == 2
    w1, w2 = seen[0]
    assert w1.data_ptr() == block.experts.gate_up_proj.data_ptr() and w1.shape == (4, 16, 24)
    assert w2.data_ptr() == block.experts.down_proj.data_ptr() and w2.shape == (4, 12, 16)
    change = report.replaced[0]
    assert (change.before, change.after) == ("Qwen2MoeSparseMoeBlock", "KernelSparseMoeBlock")
    for phrase in ("no copy", "top-2", "not renormalised", "shared expert"):
        assert phrase in change.detail
    assert "model.layers.1.mlp" in str(report)


@pytest.mark.parametrize("backend", backends())
def test_replaced_model_trains_a_step(backend):
    """Also after a forward of the original model, which installs transformers' output-recording
    hooks on the router modules: the replacement keeps those modules, so the hooks still see the
    router logits that the aux loss needs."""
    model = replace_model("mixtral", seed=3)
    ids = replace_tokens(seed=4)
    lm_loss(model, ids)
    replace_moe(model, backend=backend)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    expert_weights = model.model.layers[0].mlp.experts.gate_up_proj
    before = expert_weights.detach().clone()
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        out, loss = lm_loss(model, ids)
        assert len(out.router_logits) == 2 and out.aux_loss > 0
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert not torch.equal(expert_weights.detach(), before)


def test_router_jitter_matches_mixtral_in_training():
    """Mixtral's multiplicative jitter draws the same noise in the replacement (same RNG use)."""
    config = tf.MixtralConfig(**REPLACE_SIZES, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3)
    torch.manual_seed(5)
    original = tf.MixtralForCausalLM(config).model.layers[0].mlp.to(DEVICE).train()
    with torch.no_grad():
        original.gate.weight.normal_()
    replacement = replace_moe(copy.deepcopy(original), backend="torch").model
    assert isinstance(replacement, KernelSparseMoeBlock)
    x = torch.randn(2, 5, 16, device=DEVICE)
    torch.manual_seed(6)
    want = original(x.clone())
    torch.manual_seed(6)
    got = replacement(x)
    assert_close(got, want, torch.float32, what="jittered output")
    assert not torch.allclose(got, replacement.eval()(x))


class ToySparseMoeBlock(nn.Module):
    """A block this release does not know."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        return sum(e(x) for e in self.experts)


def test_unknown_and_unsupported_blocks_are_left_alone_and_named():
    gelu_config = tf.MixtralConfig(**REPLACE_SIZES, num_local_experts=4, num_experts_per_tok=2, hidden_act="gelu")
    gelu_block = tf.MixtralForCausalLM(gelu_config).model.layers[0].mlp
    from moe_restore.layers import TopKMoE

    model = nn.Sequential(ToySparseMoeBlock(), gelu_block, replace_model("olmoe").model.layers[0].mlp,
                          TopKMoE(16, 8, 2, 1))
    with pytest.warns(UserWarning) as caught:
        report = replace_moe(model)
    # Each block left alone is named in a warning with its reason, never skipped silently.
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("replace_moe: 0 (ToySparseMoeBlock) left as it was: unknown") for m in messages), messages
    assert any(m.startswith("replace_moe: 1 (MixtralSparseMoeBlock) left as it was:") and "SiLU" in m
               for m in messages), messages
    assert [(s.name, s.kind) for s in report.skipped] == [("0", "ToySparseMoeBlock"), ("1", "MixtralSparseMoeBlock")]
    assert "unknown" in report.skipped[0].reason and "SiLU" in report.skipped[1].reason
    assert [c.name for c in report.replaced] == ["2"]
    assert isinstance(model[0], ToySparseMoeBlock) and model[1] is gelu_block
    assert isinstance(model[3], TopKMoE)  # the library's own layer: neither replaced nor reported
    with pytest.warns(UserWarning, match="replace_moe replaced nothing in Sequential"):
        again = replace_moe(model)
    assert again.replaced == [] and ("2", "KernelSparseMoeBlock") in [(s.name, s.kind) for s in again.skipped]


def test_experts_found_by_their_hook_not_by_private_attributes():
    """transformers 5.17's experts modules have no ``_is_expert_parallel``: the block is still
    replaced (the hook is found in the class's MRO) and computes what the original computes."""
    model = replace_model("qwen3_moe")
    want = model(replace_tokens()).logits
    for layer in model.model.layers:
        layer.mlp.experts.__dict__.pop("_is_expert_parallel", None)
        assert not hasattr(layer.mlp.experts, "_is_expert_parallel")
    report = replace_moe(model, backend="torch")
    assert [c.name for c in report.replaced] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert_close(model(replace_tokens()).logits, want, torch.float32, backend="torch", what="logits")


def test_experts_without_the_hook_are_named_not_replaced():
    """Experts with the fused layout but a plain forward (no transformers hook to dispatch to the
    kernels) are left alone with a warning naming the module and the reason."""
    block = replace_model("qwen3_moe").model.layers[0].mlp
    plain = type("PlainExperts", (nn.Module,), {"forward": experts_impl.eager_forward(block.experts)})
    block.experts.__class__ = plain
    with pytest.warns(UserWarning, match=r"replace_moe: 0 \(Qwen3MoeSparseMoeBlock\) left as it was: .*experts hook"):
        report = replace_moe(nn.Sequential(block))
    assert report.replaced == [] and "@use_experts_implementation" in report.skipped[0].reason


def test_quantised_experts_are_left_alone_and_named():
    block = replace_model("qwen3_moe").model.layers[0].mlp
    block.experts.gate_up_proj.data = block.experts.gate_up_proj.data.to(torch.float8_e4m3fn)
    with pytest.warns(UserWarning, match="left as it was: .*float8_e4m3fn"):
        report = replace_moe(nn.Sequential(block))
    assert report.replaced == [] and "float8_e4m3fn" in report.skipped[0].reason


def test_bad_model_is_refused_by_name():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_moe("mixtral")
    with pytest.raises(ValueError, match="backend must be one of"):
        replace_moe(nn.Linear(2, 2), backend="cuda")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_parameter_order_and_optimizer_state_survive(family):
    """An optimizer's state is keyed by parameter position: one saved before replace_moe must load
    into an optimizer built after it and step the same parameters (shapes checked by Adam)."""
    model = replace_model(family)
    names_before = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lm_loss(model, replace_tokens())[1].backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    replace_moe(model, backend="torch")
    assert [n for n, _ in model.named_parameters()] == names_before
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt2.load_state_dict(state)
    model.zero_grad()
    lm_loss(model, replace_tokens())[1].backward()
    opt2.step()
    for p in model.parameters():
        assert opt2.state[p]["exp_avg"].shape == p.shape and opt2.state[p]["step"] == 2


def test_replaced_model_runs_under_accelerate_offload():
    """cpu_offload keeps the weights on the meta device and loads them around each module's
    forward; the replaced block reads the experts' weights through that hook."""
    accelerate = pytest.importorskip("accelerate")
    model = replace_model("qwen3_moe").cpu()
    replace_moe(model, backend="torch")
    ids = replace_tokens().cpu()
    want = model(ids).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    got = model(ids).logits
    assert torch.equal(got, want)

"""MoE(router, experts, shared_expert): the composition equals the named layers, takes any experts
module of the protocol, the dense shared expert equals S expert MLPs, the routers' losses equal a
hand computation, state dicts with the shared bank layout load, and the networks' objective protocol."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_restore.kernels import Routing, naive, topk_route
from moe_restore.layers import DenseMLP, ExpertMLPs, MoE, NestedMoE, TopKMoE, TopKRouter, shared_banks_to_dense
from moe_restore.layers.adec import ADEC
from moe_restore.losses import LossWeights, restoration_loss
from moe_restore.train.training_objective import TrainingObjective


def _randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def test_moe_of_a_topk_router_equals_topk_moe_on_the_same_weights():
    torch.manual_seed(0)
    layer = TopKMoE(6, 10, 4, 2, num_shared_experts=1, scoring="sigmoid", backend="torch")
    moe = MoE(TopKRouter(6, 4, 2, scoring="sigmoid", backend="torch"),
              ExpertMLPs(4, 6, 10, 6, backend="torch"), DenseMLP(6, 10, 6))
    moe.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 6)
    want = layer(x)
    got, record = moe.run(x)
    assert moe.last_record is None, "run keeps nothing"
    assert torch.equal(got, want)
    assert torch.equal(record.losses.aux_loss, layer.aux_loss)
    assert torch.equal(record.losses.router_z_loss, layer.router_z_loss)
    assert torch.equal(record.routing.experts, layer.last_routing.experts)


def test_topk_router_losses_equal_a_hand_computation():
    """Sigmoid scoring with a context and a bias: logits W [x ; c_b] + b, balance over the T*k
    assignments with the normalised sigmoid, z-loss mean logsumexp^2; in float64 by loops."""
    torch.manual_seed(1)
    router = _randomize_(TopKRouter(4, 3, 2, scoring="sigmoid", context_dim=2, bias=True, backend="torch"))
    tokens, context = torch.randn(6, 4), torch.randn(2, 2)
    routing, losses = router(tokens, context)
    W, b = router.weight.double(), router.bias.double()
    counts, prob_sums, z = [0] * 3, [0.0] * 3, 0.0
    for t in range(6):
        logits = (W @ torch.cat([tokens[t].double(), context[t // 3].double()]) + b).tolist()
        s = [1 / (1 + math.exp(-v)) for v in logits]
        for e in naive.stable_top_k(torch.tensor(s), 2)[1].tolist():
            counts[e] += 1
        for e in range(3):
            prob_sums[e] += s[e] / sum(s)
        z += math.log(sum(math.exp(v) for v in logits)) ** 2
    aux = 3 * sum(counts[e] / 12 * prob_sums[e] / 6 for e in range(3))
    assert routing.expert_counts().tolist() == counts
    assert abs(losses.aux_loss.item() - aux) < 1e-5 and abs(losses.router_z_loss.item() - z / 6) < 1e-4
    with pytest.raises(ValueError, match="context"):
        router(tokens)


def test_adec_is_norm_plus_moe_with_a_shared_expert_plus_residual():
    torch.manual_seed(2)
    adec = _randomize_(ADEC(5, 7, num_experts=4, top_k=2, expansion=1.4, context_proj=3, backend="torch"))
    x, context = torch.randn(2, 5, 3, 4), torch.randn(2, 7)
    u = adec.norm(x).permute(0, 2, 3, 1).reshape(-1, 5)
    proj = adec.context_proj(context)
    router, experts, shared = adec.moe.router, adec.moe.experts, adec.moe.shared_expert
    logits = u @ router.weight[:, :5].t() + (proj @ router.weight[:, 5:].t() + router.bias).repeat_interleave(12, 0)
    routing = topk_route(logits, 2, backend="torch")
    hidden = F.gelu(u @ shared.w1 + shared.b1)
    y = experts(u, routing) + hidden @ shared.w2 + shared.b2
    want = x + y.view(2, 3, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(adec(x, context), want, rtol=1e-5, atol=1e-5)
    probs = logits.softmax(-1).mean(0)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=4)
    assert abs(adec.aux_loss.item() - 4 * (counts / 48 * probs).sum().item()) < 1e-5


class _ScaledCopies(torch.nn.Module):
    """Custom experts of the protocol: Expert_e(u) = (e + 1) * (u @ W), one shared W [dim, out_dim]."""

    def __init__(self, num_experts: int, dim: int, out_dim: int):
        super().__init__()
        self.num_experts, self.dim, self.out_dim = num_experts, dim, out_dim
        self.weight = torch.nn.Parameter(torch.randn(dim, out_dim))

    def forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        scale = (routing.weights * (routing.experts + 1)).sum(dim=-1, keepdim=True)
        return scale.to(tokens.dtype) * (tokens @ self.weight)


def test_moe_takes_any_experts_module_of_the_protocol():
    """A router, custom experts and a DenseMLP shared expert, against the sum written out."""
    torch.manual_seed(5)
    router = TopKRouter(4, 3, 2, backend="torch")
    experts, shared = _ScaledCopies(3, 4, 5), DenseMLP(4, 6, 5, activation="silu")
    moe = MoE(router, experts, shared)
    x = torch.randn(2, 7, 4)
    tokens = x.reshape(-1, 4)
    routing = topk_route(router.logits(tokens), 2, backend="torch")
    weights, chosen = routing.weights, routing.experts
    scale = sum(weights[:, j:j + 1] * (chosen[:, j:j + 1] + 1) for j in range(2))
    want = scale * (tokens @ experts.weight) + F.silu(tokens @ shared.w1 + shared.b1) @ shared.w2 + shared.b2
    torch.testing.assert_close(moe(x), want.view(2, 7, 5), rtol=1e-5, atol=1e-5)
    moe(x).sum().backward()
    assert experts.weight.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0


def test_moe_refuses_experts_outside_the_protocol():
    router = TopKRouter(4, 3, 2)
    with pytest.raises(TypeError, match="lacks num_experts, dim, out_dim"):
        MoE(router, torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="experts must be an nn.Module"):
        MoE(router, object())
    bare = torch.nn.Module()
    bare.num_experts, bare.dim, bare.out_dim = 3, 4, 4
    with pytest.raises(TypeError, match="lacks forward"):
        MoE(router, bare)
    fractional = _ScaledCopies(3, 4, 4)
    fractional.num_experts = 3.0
    with pytest.raises(TypeError, match="experts.num_experts must be a positive int, got 3.0"):
        MoE(router, fractional)
    with pytest.raises(ValueError, match="routes to 3 experts, the experts module holds 4"):
        MoE(router, ExpertMLPs(4, 4, 6, 4))
    with pytest.raises(ValueError, match="shared_expert.out_dim = 5 but experts.out_dim = 4"):
        MoE(router, ExpertMLPs(3, 4, 6, 4), DenseMLP(4, 6, 5))


def _shared_bank(S: int, D: int, H: int, out: int, activation: str, bias: bool, seed: int) -> dict:
    """Tensors of S shared experts in the layout of an S-expert bank: w1 [S, D, F], b1 [S, F],
    w2 [S, H, out], b2 [S, out] (F = 2H, [gate | up], for swiglu)."""
    g = torch.Generator().manual_seed(seed)
    F_ = 2 * H if activation == "swiglu" else H
    bank = {"w1": torch.randn(S, D, F_, generator=g, dtype=torch.float64),
            "w2": torch.randn(S, H, out, generator=g, dtype=torch.float64)}
    if bias:
        bank["b1"] = torch.randn(S, F_, generator=g, dtype=torch.float64)
        bank["b2"] = torch.randn(S, out, generator=g, dtype=torch.float64)
    return bank


def _sum_of_experts64(bank: dict, u: torch.Tensor, activation: str) -> torch.Tensor:
    """sum_s act(u @ w1[s] + b1[s]) @ w2[s] + b2[s], in float64."""
    return sum(naive.expert_mlp(u, bank["w1"][s], bank["b1"][s] if "b1" in bank else None, bank["w2"][s],
                                bank["b2"][s] if "b2" in bank else None, activation)
               for s in range(bank["w1"].shape[0]))


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False), ("swiglu", True), ("relu", True)])
def test_dense_shared_expert_equals_the_sum_of_s_expert_mlps(activation, bias):
    """A TopKMoE's shared expert (num_shared_experts=3) is one DenseMLP of width 3H; loaded from
    three expert MLPs in the bank layout (the format the layers wrote before, and still load through
    ``shared_banks_to_dense``), it computes their sum, in float64."""
    S, D, H, out = 3, 5, 4, 6
    layer = TopKMoE(D, H, 4, 2, activation=activation, bias=bias, num_shared_experts=S, out_dim=out,
                    backend="torch").double()
    assert isinstance(layer.shared_expert, DenseMLP) and layer.shared_expert.hidden_dim == S * H
    bank = _shared_bank(S, D, H, out, activation, bias, seed=6)
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith("shared_expert.")}
    old.update({"shared_expert." + name: t for name, t in bank.items()})
    snapshot = {k: v.clone() for k, v in old.items()}
    layer.load_state_dict(shared_banks_to_dense(layer, old))
    assert all(torch.equal(old[k], snapshot[k]) for k in old), "the input state dict is not modified"
    u = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(layer.shared_expert(u), _sum_of_experts64(bank, u, activation), rtol=1e-12, atol=1e-12)
    routed = layer.experts(u, layer.router(u, None)[0])
    torch.testing.assert_close(layer(u), routed + _sum_of_experts64(bank, u, activation), rtol=1e-12, atol=1e-12)
    again = shared_banks_to_dense(layer, layer.state_dict())
    assert all(torch.equal(again[k], v) for k, v in layer.state_dict().items()), "the new layout passes through"


def test_state_dicts_of_the_shared_bank_layout_load_into_adec_and_nested_moe():
    """ADEC's single shared expert ([1, D, H] before) and a NestedMoE's two (NestedMoE nested in a
    container, so the keys carry a prefix): the converted state dict gives the same output, in float64."""
    torch.manual_seed(8)
    adec = _randomize_(ADEC(4, 3, num_experts=3, top_k=2, expansion=1.0, context_proj=2, backend="torch")).double()
    old = dict(adec.state_dict())
    for name in ("w1", "b1", "w2", "b2"):
        old["moe.shared_expert." + name] = old["moe.shared_expert." + name][None]
    fresh = ADEC(4, 3, num_experts=3, top_k=2, expansion=1.0, context_proj=2, backend="torch").double()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(old)
    fresh.load_state_dict(shared_banks_to_dense(fresh, old))
    x, context = torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    assert torch.equal(fresh(x, context), adec(x, context))

    model = torch.nn.Sequential(NestedMoE(5, 3, 2, 2, 1, 1, num_shared_experts=2, activation="swiglu",
                                          backend="torch")).double()
    bank = _shared_bank(2, 5, 3, 5, "swiglu", True, seed=9)
    old = {k: v for k, v in model.state_dict().items() if ".shared_expert." not in k}
    old.update({"0.shared_expert." + name: t for name, t in bank.items()})
    model.load_state_dict(shared_banks_to_dense(model, old))
    u = torch.randn(6, 5, dtype=torch.float64)
    layer = model[0]
    routed = layer.experts(u, layer.router(u, None)[0])
    torch.testing.assert_close(model(u), routed + _sum_of_experts64(bank, u, "swiglu"), rtol=1e-12, atol=1e-12)


def _as_shared_bank(state: dict) -> dict:
    """``state`` with every single shared expert in the bank layout of one expert ([1, ...])."""
    return {k: v[None] if ".shared_expert." in k else v for k, v in state.items()}


def test_the_checkpoint_loaders_read_the_shared_bank_layout(tmp_path):
    """M2IR through ``eval``'s loader (``load_model``) and MiM-DiT through ``from_pretrained``, from
    files whose shared experts are in the bank layout: the same outputs as the models saved."""
    from types import SimpleNamespace

    from moe_restore.models import MiMDiT, MiMDiTConfig, build
    from moe_restore.models.mim_dit.persistence import WEIGHTS
    from moe_restore.train.checkpoint import save_checkpoint
    from moe_restore.train.inference import load_model

    torch.manual_seed(9)
    m2ir = _randomize_(build("m2ir-tiny", num_classes=2, backend="torch")).eval()
    old = _as_shared_bank(m2ir.state_dict())
    assert any(v.dim() == 3 and ".shared_expert.w1" in k for k, v in old.items())
    config = {"model": "m2ir-tiny", "model_config": {k: v for k, v in m2ir.config.to_dict().items() if k != "backend"}}
    save_checkpoint(tmp_path / "old.pt", model=SimpleNamespace(state_dict=lambda: old), config=config)
    loaded, _ = load_model(tmp_path / "old.pt", backend="torch")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), m2ir(x))

    dit = MiMDiT(MiMDiTConfig(hidden=16, depth=1, heads=2, sample_size=8, context_dim=4, encoder_width=8,
                              ffn_init="shared", backend="torch")).eval()
    dit.save_pretrained(tmp_path / "dit")
    torch.save(_as_shared_bank(torch.load(tmp_path / "dit" / WEIGHTS)), tmp_path / "dit" / WEIGHTS)
    again = MiMDiT.from_pretrained(tmp_path / "dit").eval()
    x, cond, t = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.tensor([300.0])
    context, _ = dit.degradation_context(cond)
    with torch.no_grad():
        assert torch.equal(again(x, cond, t, context), dit(x, cond, t, context))


def test_losses_before_any_forward_raise():
    with pytest.raises(RuntimeError, match="after a forward"):
        TopKMoE(4, 6, 2, 1).aux_loss


def test_the_trainer_calls_the_networks_declared_objective():
    from moe_restore.models import build

    with pytest.raises(TypeError, match="training_loss"):
        TrainingObjective(torch.nn.Conv2d(3, 3, 1), LossWeights())
    torch.manual_seed(4)
    model = build("m2ir-tiny", num_classes=2, backend="torch")
    with torch.no_grad():
        model.output.weight.normal_(0, 0.1)  # not the identity map
    degraded, clean, labels = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    weights = LossWeights(relative=0.5)
    total, terms = TrainingObjective(model, weights)(degraded, clean, labels)
    restored = model(degraded, labels=labels)
    want, want_terms = restoration_loss(restored.float(), clean, weights=weights, aux_loss=model.aux_loss,
                                        class_logits=model.class_logits, labels=labels, inputs=degraded)
    assert torch.equal(total, want) and terms == want_terms
    assert set(terms) == {"charbonnier", "fft", "load_balance", "classification"}


def test_benchmark_results_go_under_the_working_directory(tmp_path, monkeypatch):
    from moe_restore.benchmarks.common import results_dir

    monkeypatch.delenv("MOE_RESTORE_RESULTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert results_dir() == tmp_path / "benchmarks" / "results"
    monkeypatch.setenv("MOE_RESTORE_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert results_dir() == tmp_path / "elsewhere"

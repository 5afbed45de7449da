"""MoE(router, experts, shared_expert): the composition equals the named layers, the routers' losses
equal a hand computation, legacy state dicts load, and the networks' objective protocol."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from moe_restore.kernels import topk_route
from moe_restore.layers.experts import ExpertMLPs
from moe_restore.layers.adec import ADEC
from moe_restore.layers.moe import MoE, per_pixel
from moe_restore.layers.topk_moe import TopKMoE
from moe_restore.layers.routers import TopKRouter
from moe_restore.losses import LossWeights, restoration_loss
from moe_restore.train.objective import TrainingObjective


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
              ExpertMLPs(4, 6, 10, 6, backend="torch"), ExpertMLPs(1, 6, 10, 6, backend="torch"))
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
        for e in sorted(range(3), key=lambda e: (-s[e], e))[:2]:
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
    hidden = F.gelu(u @ shared.w1[0] + shared.b1[0])
    y = experts(u, routing) + hidden @ shared.w2[0] + shared.b2[0]
    want = x + y.view(2, 3, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(adec(x, context), want, rtol=1e-5, atol=1e-5)
    probs = logits.softmax(-1).mean(0)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=4)
    assert abs(adec.aux_loss.item() - 4 * (counts / 48 * probs).sum().item()) < 1e-5


def test_state_dicts_from_before_the_composition_load():
    torch.manual_seed(3)
    layer = TopKMoE(6, 8, 3, 2, num_shared_experts=1, backend="torch")
    legacy = {k.replace("experts.", "").replace("shared_expert.", "shared_experts."): v
              for k, v in layer.state_dict().items()}
    assert "w1" in legacy and "shared_experts.w1" in legacy
    again = pickle.loads(pickle.dumps(TopKMoE(6, 8, 3, 2, num_shared_experts=1, backend="torch")))
    again.load_state_dict(legacy)  # the renaming hook survives pickling
    x = torch.randn(4, 6)
    assert torch.equal(again(x), layer(x))

    adec = _randomize_(ADEC(4, 3, num_experts=3, top_k=2, expansion=1.0, context_proj=2, backend="torch"))
    s, moe = adec.state_dict(), "moe."
    old = {k: v for k, v in s.items() if not k.startswith(moe)}
    old["router_features.weight"], old["router_context.weight"] = s["moe.router.weight"].split([4, 2], dim=1)
    old["router_features.bias"] = s["moe.router.bias"]
    for name in ("w1", "b1", "w2", "b2"):
        old[name] = s["moe.experts." + name]
    old["shared.0.weight"] = s["moe.shared_expert.w1"][0].t()[:, :, None, None]
    old["shared.0.bias"], old["shared.2.bias"] = s["moe.shared_expert.b1"][0], s["moe.shared_expert.b2"][0]
    old["shared.2.weight"] = s["moe.shared_expert.w2"][0].t()[:, :, None, None]
    fresh = ADEC(4, 3, num_experts=3, top_k=2, expansion=1.0, context_proj=2, backend="torch")
    fresh.load_state_dict(old)
    x, context = torch.randn(1, 4, 3, 3), torch.randn(1, 3)
    assert torch.equal(fresh(x, context), adec(x, context))


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

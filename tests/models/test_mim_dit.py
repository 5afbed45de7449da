"""MiM-DiT: upcycling keeps the pretrained DiT's function, gradients reach both router levels,
sampling is deterministic and size-preserving, persistence round-trips, the model overfits a pair."""
from __future__ import annotations

import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from moe_restore.models.mim_dit import MiMDiT, MiMDiTConfig  # noqa: E402
from utils import backends  # noqa: E402


def small_dit(seed: int = 0):
    """A random diffusers DiT (learned sigma: 6 output channels) with its zero-initialised
    adaLN and output layers perturbed, so that every path of the network matters."""
    torch.manual_seed(seed)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                          out_channels=6, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit")
    small_dit().save_pretrained(path)
    return path


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("ffn_init", ["upcycle", "shared"])
def test_upcycled_model_computes_what_the_dense_dit_computed(dit_dir, backend, ffn_init):
    dense = diffusers.DiTTransformer2DModel.from_pretrained(dit_dir).eval()
    model = MiMDiT.from_pretrained_dit(dit_dir, context_dim=8, ffn_init=ffn_init, backend=backend).eval()
    gen = torch.Generator().manual_seed(1)
    noisy, degraded = torch.randn(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    timestep, labels = torch.tensor([120.0, 870.0]), torch.tensor([3, 7])
    with torch.no_grad():
        want = dense(noisy, timestep=timestep, class_labels=labels).sample[:, :3]
        context, _ = model.degradation_context(degraded)
        got = model(noisy, model.encode(degraded), timestep, context, class_labels=labels)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_both_router_levels_and_used_experts():
    config = MiMDiTConfig(hidden=16, depth=1, heads=2, sample_size=8, context_dim=8, encoder_width=8,
                          groups=3, experts_per_group=2, top_k_groups=2, top_k_experts=1, noise_std=0.02)
    model = MiMDiT(config)
    gen = torch.Generator().manual_seed(0)
    clean, degraded = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    loss, parts = model.training_loss(degraded, clean, torch.tensor([0, 2]), generator=gen)
    loss.backward()
    moe = model.moe_layers[0]
    assert {"flow", "load_balance", "group_ce", "classification"} <= set(parts)
    assert moe.router.group_router.weight.grad.abs().sum() > 0
    assert moe.router.expert_router.weight.grad.abs().sum() > 0
    used = moe.last_routing.expert_counts() > 0
    per_expert = moe.experts.w1.grad.abs().flatten(1).sum(1)
    assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()
    assert all(p.grad is not None for p in model.degradation_encoder.parameters())


def test_sampling_is_deterministic_and_keeps_odd_sizes():
    model = MiMDiT(MiMDiTConfig(hidden=16, depth=1, heads=2, sample_size=8, context_dim=4, encoder_width=8)).eval()
    degraded = torch.rand(2, 3, 9, 13)
    first = model.restore(degraded, steps=2, generator=torch.Generator().manual_seed(5))
    second = model.restore(degraded, steps=2, generator=torch.Generator().manual_seed(5))
    other = model.restore(degraded, steps=2, generator=torch.Generator().manual_seed(6))
    assert first.shape == degraded.shape and torch.equal(first, second) and not torch.equal(first, other)
    assert 0 <= first.min() and first.max() <= 1
    with pytest.raises(ValueError, match="strength"):
        model.restore(degraded, strength=0.0)


def test_save_and_reload(tmp_path):
    model = MiMDiT(MiMDiTConfig(hidden=16, depth=2, heads=2, sample_size=8, context_dim=4, encoder_width=8,
                                noise_std=0.05)).eval()
    model.save_pretrained(tmp_path)
    again = MiMDiT.from_pretrained(tmp_path).eval()
    x, cond, t = torch.randn(1, 3, 8, 10), torch.randn(1, 3, 8, 10), torch.tensor([300.0])
    context, _ = model.degradation_context(cond)
    with torch.no_grad():
        assert torch.equal(model(x, cond, t, context), again(x, cond, t, context))


def test_the_degradation_context_lives_for_one_forward_only():
    """The context reaches the MoE feed-forward layers during ``forward`` and no attribute holds
    it after; a feed-forward layer that reads a context raises outside its model's forward (also
    inside another model's), and so does a forward without the context it needs."""
    config = MiMDiTConfig(hidden=16, depth=2, heads=2, sample_size=8, context_dim=4, encoder_width=8, backend="torch")
    model, other = MiMDiT(config).eval(), MiMDiT(config).eval()
    x, cond, t = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor([300.0, 700.0])
    context = torch.randn(2, 4)
    seen = []
    hook = model.dit.transformer_blocks[1].ff.register_forward_pre_hook(
        lambda ff, args: seen.append(ff.scope.context()))
    with torch.no_grad():
        out = model(x, cond, t, context)
        again = model(x, cond, t, 3 * context)
    hook.remove()
    assert seen[0] is context and not torch.equal(out, again), "the routers read this forward's context"
    for module in model.modules():
        kept = [name for name, value in vars(module).items() if isinstance(value, torch.Tensor)
                and value.shape == context.shape and (value is context or torch.equal(value, 3 * context))]
        assert not kept, f"{type(module).__name__} keeps the context in {kept}"
    assert not any(isinstance(getattr(model.scope, slot), torch.Tensor) for slot in type(model.scope).__slots__)
    twin = pickle.loads(pickle.dumps(model))  # a copy's feed-forward layers read the copy's scope
    with torch.no_grad():
        assert twin.dit.transformer_blocks[0].ff.scope is twin.scope and torch.equal(twin(x, cond, t, context), out)
    hidden = torch.randn(2, 16, 16)
    for ff in (model.dit.transformer_blocks[0].ff, other.dit.transformer_blocks[0].ff):
        with pytest.raises(RuntimeError, match="inside its MiMDiT.forward"):
            ff(hidden)
    with model.scope.active(context), pytest.raises(RuntimeError, match="inside its MiMDiT.forward"):
        other.dit.transformer_blocks[0].ff(hidden)
    with model.scope.active(context), pytest.raises(RuntimeError, match="already running"):
        model(x, cond, t, context)
    with pytest.raises(ValueError, match="context"):
        model(x, cond, t)

    def fail(*_):
        raise ArithmeticError("inside the forward")

    hook = model.dit.transformer_blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(ArithmeticError):
        model(x, cond, t, context)
    hook.remove()
    with pytest.raises(RuntimeError, match="inside its MiMDiT.forward"):
        model.dit.transformer_blocks[0].ff(hidden)  # a forward that failed leaves no context behind


@pytest.mark.skipif("triton" not in backends(), reason="compiles the Triton path (custom ops)")
def test_the_model_compiles_to_one_graph():
    """The scoped context costs no graph break: torch.compile(fullgraph=True) traces the whole
    forward and follows a new context."""
    torch.manual_seed(0)
    model = MiMDiT(MiMDiTConfig(hidden=16, depth=1, heads=2, sample_size=8, context_dim=4, encoder_width=8,
                                backend="triton")).eval()
    x, cond, t = torch.randn(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.tensor([100.0, 600.0])
    context = torch.randn(2, 4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for c in (context, 3 * context):
            torch.testing.assert_close(compiled(x, cond, t, c), model(x, cond, t, c), rtol=1e-5, atol=1e-5)


def test_latent_space_with_a_local_vae(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    model = MiMDiT(MiMDiTConfig(hidden=16, depth=1, heads=2, sample_size=8, sample_channels=4, cond_channels=4,
                                context_dim=4, encoder_width=8), vae=vae).eval()
    degraded = torch.rand(1, 3, 16, 16)
    assert model.encode(degraded).shape == (1, 4, 8, 8)
    assert model.restore(degraded, steps=2).shape == degraded.shape
    loss, _ = model.training_loss(degraded, torch.rand(1, 3, 16, 16))
    loss.backward()
    assert all(p.grad is None for p in model.vae.parameters()), "the VAE stays frozen"


@pytest.mark.slow
def test_tiny_model_overfits_one_pair():
    torch.manual_seed(0)
    model = MiMDiT(MiMDiTConfig(hidden=32, depth=1, heads=2, sample_size=8, context_dim=8, encoder_width=8,
                                backend="torch"))
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(1, 3, 8, 8, generator=gen)
    degraded = (clean * 0.5 + 0.1 * torch.randn(1, 3, 8, 8, generator=gen)).clamp(0, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = model.training_loss(degraded.expand(4, -1, -1, -1), clean.expand(4, -1, -1, -1), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    restored = model.restore(degraded, steps=8, generator=torch.Generator().manual_seed(1))
    before = (degraded - clean).square().mean()
    after = (restored - clean).square().mean()
    assert after < 0.25 * before, f"sampled output did not approach the target: mse {after:.4f} vs {before:.4f}"

"""replace_moe beyond the four rebuilt blocks: Llama 4's and DBRX's MoE blocks (experts outside
transformers' experts hook) rebuilt on moe_mlp, and the blocks whose experts use the hook
(DeepSeek-V2/V3, ...) kept with their experts on moe_restore; each equal to the stock model
(float32 logits and every gradient, <= 1e-5 relative), moe_mlp really running, the report naming
what changed, and the state dict unchanged through save_pretrained and a reload. Also: the experts
implementation "moe_restore" survives save_pretrained / from_pretrained."""
from __future__ import annotations

import json

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

from hf_tiny_models import NoTinyModel, count_moe_mlp, hook_families, relative_error, tiny_model  # noqa: E402,F401 - a fixture
from moe_restore.integration import from_pretrained, replace_moe  # noqa: E402
from utils import backends  # noqa: E402

TOL = 1e-5
VOCAB = 64


def _llama4():
    if not hasattr(tf, "Llama4TextConfig"):
        pytest.skip(f"transformers {tf.__version__} has no Llama 4")
    return tf.Llama4ForCausalLM(tf.Llama4TextConfig(
        hidden_size=16, intermediate_size=12, intermediate_size_mlp=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=VOCAB, num_local_experts=5, num_experts_per_tok=2,
        interleave_moe_layer_step=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None))


def _dbrx():
    if not hasattr(tf, "DbrxConfig"):
        pytest.skip(f"transformers {tf.__version__} has no DBRX")
    return tf.DbrxForCausalLM(tf.DbrxConfig(
        d_model=16, n_heads=2, n_layers=2, max_seq_len=32, vocab_size=VOCAB,
        attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=12, moe_num_experts=5, moe_top_k=2, moe_normalize_expert_weights=1.0)))


def _jetmoe():
    if not hasattr(tf, "JetMoeConfig"):
        pytest.skip(f"transformers {tf.__version__} has no JetMoE")
    return tf.JetMoeForCausalLM(tf.JetMoeConfig(
        hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
        vocab_size=VOCAB, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=32, bos_token_id=0,
        eos_token_id=1, pad_token_id=None))


REBUILT = {"llama4": (_llama4, "Llama4TextMoe", "KernelLlama4TextMoe"),
           "dbrx": (_dbrx, "DbrxFFN", "KernelDbrxFFN"),
           "jetmoe": (_jetmoe, "JetMoeMoE", "KernelJetMoeMoE")}
# Left alone and named: JetMoE's mixture of attention heads (an `experts` child of its attention).
SKIPPED = {"jetmoe": [("model.layers.0.self_attention", "JetMoeAttention"),
                      ("model.layers.1.self_attention", "JetMoeAttention")]}


def _randomized(model):
    """``model`` in float32 eval mode with N(0, 0.3^2) weights: large enough that the routers are far
    from uniform."""
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _model(family: str):
    torch.manual_seed(0)
    return _randomized(REBUILT[family][0]())


def _forward_backward(model, seq2seq: bool = False):
    """(outputs, every parameter's gradient) of one forward on random tokens (and decoder tokens,
    with the router outputs recorded, for a seq2seq model) and a backward of randomly weighted logits."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=gen)}
    if seq2seq:
        inputs.update(decoder_input_ids=torch.randint(0, VOCAB, (2, 5), generator=gen), output_router_logits=True)
    out = model(**inputs, use_cache=False)
    (out.logits * torch.randn(out.logits.shape, generator=gen)).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _logits_and_grads(model):
    out, grads = _forward_backward(model)
    return out.logits.detach(), grads


def _assert_equal_to(got, want, what):
    (y, g), (y_ref, g_ref) = got, want
    assert set(g) == set(g_ref), what
    err_y, err_g = relative_error(y, y_ref), max(relative_error(g[n], g_ref[n]) for n in g_ref)
    assert err_y <= TOL and err_g <= TOL, (what, err_y, err_g)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", list(REBUILT))
def test_rebuilt_blocks_match_the_stock_model(family, backend, count_moe_mlp, tmp_path):
    model = _model(family)
    keys = list(model.state_dict())
    want = _logits_and_grads(model)
    report = replace_moe(model, backend=backend)
    _, before, after = REBUILT[family]
    assert [(c.before, c.after) for c in report.replaced] == [(before, after)] * 2
    assert [(s.name, s.kind) for s in report.skipped] == SKIPPED.get(family, [])
    assert "experts" in report.replaced[0].detail
    assert list(model.state_dict()) == keys
    got = _logits_and_grads(model)
    assert count_moe_mlp and set(count_moe_mlp) == {backend}
    _assert_equal_to(got, want, family)

    # saved, the stock model's parameter names; reloaded through from_pretrained, rebuilt again
    model.save_pretrained(tmp_path)
    count_moe_mlp.clear()
    reloaded = from_pretrained(type(model), tmp_path)
    assert sum(type(m).__name__ == after for m in reloaded.modules()) == 2
    assert list(reloaded.state_dict()) == keys
    with torch.no_grad():  # (JetMoE's stock model too differs from its own reload by ~2e-7: its attention)
        ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        got, want = reloaded(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits
        assert relative_error(got, want) <= TOL
    assert count_moe_mlp


def _switch(expert_capacity: int, activation: str):
    if not hasattr(tf, "SwitchTransformersConfig"):
        pytest.skip(f"transformers {tf.__version__} has no Switch Transformers")
    torch.manual_seed(0)
    return _randomized(tf.SwitchTransformersForConditionalGeneration(tf.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=12, num_layers=2, num_decoder_layers=2, num_heads=2,
        num_experts=4, expert_capacity=expert_capacity, encoder_sparse_step=1, decoder_sparse_step=1,
        dense_act_fn=activation, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)))


def _router_outputs(out) -> list[torch.Tensor]:
    """The router outputs a seq2seq MoE model records (its z-loss and balancing-loss inputs), flattened."""
    found = []

    def collect(value):
        if isinstance(value, torch.Tensor):
            found.append(value.detach())
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)

    for key, value in out.items():
        if "router" in key or key.endswith("_loss"):
            collect(value)
    return found


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize(("expert_capacity", "activation"), [(2, "relu"), (64, "gelu_new"), (3, "silu")])
def test_switch_transformers_blocks_match_the_stock_model(expert_capacity, activation, backend, count_moe_mlp,
                                                          tmp_path):
    """Top-1 routing with the expert capacity as the stock router decides it (2 and 3 of 7 tokens
    per sequence: tokens dropped on transformers 5.25, which counts the capacity per sequence), the
    router outputs the model records as the stock model's; every parameter's gradient as the stock model's, except that an
    expert no token reached gets an exact zero where the stock block leaves None (its weights are
    stacked for moe_mlp)."""
    model = _switch(expert_capacity, activation)
    keys = list(model.state_dict())
    out, want_g = _forward_backward(model, seq2seq=True)
    want_y, want_routers = out.logits.detach(), _router_outputs(out)
    report = replace_moe(model, backend=backend)
    assert [(c.before, c.after) for c in report.replaced] == \
        [("SwitchTransformersSparseMLP", "KernelSwitchTransformersSparseMLP")] * 4
    assert not report.skipped and "capacity" in report.replaced[0].detail
    assert list(model.state_dict()) == keys
    out, got_g = _forward_backward(model, seq2seq=True)
    got_y, got_routers = out.logits.detach(), _router_outputs(out)
    assert count_moe_mlp and set(count_moe_mlp) == {backend}
    assert want_routers and len(got_routers) == len(want_routers)
    assert all(got.shape == want.shape and relative_error(got, want) <= TOL
               for got, want in zip(got_routers, want_routers))
    unreached = set(got_g) - set(want_g)
    assert set(want_g) <= set(got_g) and all(torch.count_nonzero(got_g[n]) == 0 for n in unreached)
    _assert_equal_to((got_y, {n: got_g[n] for n in want_g}), (want_y, want_g), f"switch {activation}")

    model.save_pretrained(tmp_path)
    reloaded = from_pretrained(type(model), tmp_path)
    assert sum(type(m).__name__ == "KernelSwitchTransformersSparseMLP" for m in reloaded.modules()) == 4
    assert list(reloaded.state_dict()) == keys


def test_switch_transformers_expert_dropout_runs_the_stock_experts(count_moe_mlp):
    """The experts' dropout has no kernel counterpart: while training with it on, the stock
    experts run (same random stream, so the same output); in eval mode the kernels do."""
    model, replaced = _switch(3, "relu"), _switch(3, "relu")
    replace_moe(replaced, backend="torch")
    for twin in (model, replaced):
        for name, module in twin.named_modules():
            if name.split(".")[-1].startswith("expert_"):
                module.dropout.p = 0.5
    model.train(), replaced.train()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    want = model(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=False).logits
    torch.manual_seed(5)
    got = replaced(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=False).logits
    assert not count_moe_mlp and torch.equal(got, want)
    replaced.eval()
    replaced(input_ids=ids, decoder_input_ids=ids[:, :5], use_cache=False)
    assert count_moe_mlp


def test_nllb_moe_is_left_alone_with_the_reason_its_dispatch_gives():
    """NLLB-MoE's stock experts module runs expert_1 for every first choice and expert_0 for every
    second, whatever the router chose: replace_moe says so and leaves the blocks alone. Should
    transformers fix the dispatch, the first assertion fails and the block can be rebuilt."""
    if not hasattr(tf, "NllbMoeConfig"):
        pytest.skip(f"transformers {tf.__version__} has no NLLB-MoE")
    torch.manual_seed(0)
    model = _randomized(tf.NllbMoeForConditionalGeneration(tf.NllbMoeConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=12, decoder_ffn_dim=12, num_experts=4, encoder_sparse_step=1,
        decoder_sparse_step=1, expert_capacity=64, max_position_embeddings=32, decoder_start_token_id=0,
        pad_token_id=1)))
    _forward_backward(model, seq2seq=True)
    trained = {n.split("experts.")[1].split(".")[0] for n, p in model.named_parameters()
               if "experts." in n and p.grad is not None and torch.count_nonzero(p.grad)}
    assert trained == {"expert_0", "expert_1"}
    with pytest.warns(UserWarning, match="replaced nothing"):
        report = replace_moe(model)
    assert not report.replaced and len(report.skipped) == 4
    assert all(s.kind == "NllbMoeSparseMLP" and "expert_1" in s.reason for s in report.skipped)


# Blocks whose experts use the hook (routing their own: DeepSeek's grouped top-k with the score
# correction bias and routed scaling, shared experts, Jamba's and PhiMoE's routers, ...).
HOOKED_BLOCKS = ["deepseek_v2", "deepseek_v3", "jamba", "phimoe", "granitemoe", "ernie4_5_moe", "glm4_moe"]


@pytest.mark.parametrize("family", HOOKED_BLOCKS)
def test_hooked_blocks_are_kept_with_their_experts_on_the_kernels(family, count_moe_mlp):
    if family not in hook_families():
        pytest.skip(f"transformers {tf.__version__}: {family} does not use the experts hook (or is missing)")
    try:
        model = tiny_model(family)
    except NoTinyModel as error:
        pytest.skip(str(error))
    model.set_experts_implementation("eager")
    want = _logits_and_grads(model)
    report = replace_moe(model, backend="torch")
    assert report.replaced and not report.skipped, str(report)
    assert all(c.before == c.after and 'experts_implementation="moe_restore_torch"' in c.detail
               for c in report.replaced), str(report)
    got = _logits_and_grads(model)
    assert count_moe_mlp and set(count_moe_mlp) == {"torch"}
    _assert_equal_to(got, want, family)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_experts_implementation_survives_save_and_load(family, count_moe_mlp, tmp_path):
    model = tiny_model(family)
    model.set_experts_implementation("moe_restore_torch")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["experts_implementation"] == "moe_restore_torch"
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._experts_implementation == "moe_restore_torch"
    want = _logits_and_grads(model)
    count_moe_mlp.clear()
    got = _logits_and_grads(reloaded)
    assert count_moe_mlp and torch.equal(got[0], want[0])

    # from_pretrained(..., experts_implementation=) is saved alike; any other choice is not
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_restore")
    loaded.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["experts_implementation"] == "moe_restore"
    loaded.set_experts_implementation("eager")
    loaded.save_pretrained(tmp_path)
    assert "experts_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path).config._experts_implementation != "moe_restore"


def test_saved_implementation_needs_moe_restore_to_load(tmp_path):
    """The saved name is one transformers alone does not know: it refuses it, and an explicit
    experts_implementation= loads the directory without moe_restore."""
    import subprocess
    import sys

    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("moe_restore")
    model.save_pretrained(tmp_path / "saved")
    load = ("import sys, transformers as tf; m = tf.AutoModelForCausalLM.from_pretrained('saved'{}); "
            "assert 'moe_restore' not in sys.modules; print(m.config._experts_implementation)")
    refused = subprocess.run([sys.executable, "-c", load.format("")], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode != 0 and 'experts_implementation="moe_restore"' in refused.stderr, refused.stderr[-500:]
    loaded = subprocess.run([sys.executable, "-c", load.format(", experts_implementation='grouped_mm'")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "grouped_mm", loaded.stderr[-500:]

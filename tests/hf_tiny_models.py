"""Tiny random transformers models of every family whose experts use transformers' experts hook
(``@use_experts_implementation``), found in the installed transformers, for the integration tests."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from utils import DEVICE

# One tiny size for every family; a family reads the names it knows and ignores the others.
TINY = dict(hidden_size=32, intermediate_size=32, moe_intermediate_size=16, expert_intermediate_size=16,
            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, vocab_size=64, num_experts=4, n_routed_experts=4, num_local_experts=4,
            num_experts_per_tok=2, moe_topk=2, n_group=1, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=0, max_position_embeddings=64, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, num_dense_layers=0,
            moe_layer_start_index=0, mlp_only_layers=[], expert_layer_offset=0, expert_layer_period=1,
            decoder_sparse_step=1, moe_layer_freq=1)
VOCAB = TINY["vocab_size"]
# Family-specific sizes on top of TINY, each with why the generic size does not build.
# MLA: the rotary tables are built from head_dim, which must equal qk_rope_head_dim; every head has its
# own keys, so grouped KV heads (one for two query heads) fail sdpa's shape check under torch.compile
_MLA = dict(head_dim=8, num_key_value_heads=2)
# MLA with sparse (DSA) attention: the indexer's sizes default to the full model's.
_DSA = dict(_MLA, index_n_heads=2, index_head_dim=16, index_topk=4)
OVERRIDES: dict[str, dict] = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "longcat_flash": _MLA, "deepseek_v32": _DSA, "glm_moe_dsa": _DSA,
    "mistral_large4": _DSA, "axk1": _MLA, "axk2": _DSA, "hy_v4": _DSA, "hy_v4_vl": _DSA,
    # per-layer attention: two indexed (DSA) layers, so no sliding-window per-layer config is needed
    "dots3_note": dict(_DSA, layer_types=["indexed_attention"] * 2, mlp_layer_types=["sparse"] * 2,
                       shared_experts_intermediate_size=16),
    # mamba layers: heads x head width must equal mamba_expand (2) x hidden_size
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                             layer_types=["linear_attention", "full_attention"]),
    # the router reads its own top-k name, with no default
    "diffusion_gemma": dict(top_k_experts=2),
    # the MoE block is off by default, its top-k name has no default; per-layer embeddings are full-size
    "gemma4": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=64,
                   hidden_size_per_layer_input=8),
    # one short-conv and one attention layer (the per-layer list has no default)
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    # the per-layer MLP kinds have no default in these configs: both layers sparse
    "beam": dict(mlp_layer_types=["sparse"] * 2),
    "deepseek_ocr2": dict(mlp_layer_types=["sparse"] * 2),
    # both layers sparse; the sliding-window mask is built whatever the layer types, and the window
    # has no default
    "step3p7": dict(mlp_layer_types=["sparse"] * 2, sliding_window=4),
    # linear-attention heads (and glm5_next's indexer) keep their full-model sizes (64 x 128: ~20 s eager on a CPU)
    "glm5_next": dict(_DSA, mlp_layer_types=["sparse"] * 2, linear_num_heads=2, linear_head_dim=16),
    "kimi_linear": dict(linear_num_heads=2, linear_head_dim=16),
    # 3D rope: height+width and time sections fill the half head width (16 / 2)
    "ernie4_5_vl_moe": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2])),
    # multimodal rope: the three position sections must fill the rotary half-width (16 * 0.5 / 2)
    "glm4v_moe": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                           mrope_section=[2, 1, 1])),
}


def hook_families() -> list[str]:
    """The model types whose modeling file decorates an experts class with the hook (read from the
    source, without importing the 60-odd modules)."""
    import transformers.models

    root = os.path.dirname(transformers.models.__file__)
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, f"modeling_{name}.py")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if "@use_experts_implementation" in f.read():
                    found.append(name)
    return found


def is_hooked(cls: type) -> bool:
    """Whether ``cls`` is an experts class decorated with ``@use_experts_implementation``: its
    forward is the decorator's dispatcher (defined in transformers/integrations/moe.py)."""
    forward = cls.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_filename.replace(os.sep, "/").endswith("integrations/moe.py")


def _shrink(config, sizes: dict) -> None:
    """Set the tiny ``sizes`` on a config built with defaults (and on its sub-configs)."""
    for key, value in sizes.items():
        try:
            current = getattr(config, key, None)
            # A per-layer list or a dict is left alone unless a list or dict replaces it
            if current is not None and (isinstance(value, (list, dict)) or not isinstance(current, (list, dict))):
                setattr(config, key, value)
        except Exception:  # noqa: BLE001 - per-layer attributes refuse a global value: leave them
            pass
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 0)
    for sub in getattr(config, "sub_configs", None) or {}:
        if getattr(config, sub, None) is not None:
            _shrink(getattr(config, sub), sizes)


class NoTinyModel(RuntimeError):
    """No tiny model of a family builds from the generic sizes and its overrides: a family new in
    the installed transformers that needs sizes of its own (the tests report it and skip it)."""


def _distinct_hash_experts(model: torch.nn.Module) -> None:
    """Give hash routers (DeepSeek-V4's ``tid2eid``: token id -> its k experts, a frozen table that a
    checkpoint holds) distinct experts per token, (t + j) mod E, in place of the zeros a random
    init leaves: with every slot on expert 0 and weights normalised to sum 1, the router's
    gradient is exactly zero and the comparison of two roundoff noises."""
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor) and hasattr(module, "num_experts"):
            vocab, k = table.shape
            ids = (torch.arange(vocab)[:, None] + torch.arange(k)) % module.num_experts
            table.copy_(ids.to(table.dtype))


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A float32 tiny random model of ``family`` holding at least one hooked experts module: its
    causal LM if that has experts, else its text model, else its base model. Raises NoTinyModel
    if none builds."""
    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    hooked = tuple(c for c in classes if is_hooked(c))
    models = [c for c in classes if issubclass(c, PreTrainedModel) and not c.__name__.endswith("PreTrainedModel")]
    ranked = ([c for c in models if c.__name__.endswith("ForCausalLM")] + [c for c in models if c.__name__.endswith("TextModel")]
              + [c for c in models if c.__name__.endswith("Model")])
    sizes = {**TINY, **OVERRIDES.get(family, {})}
    first_error: Exception | None = None
    for cls in ranked:
        try:
            try:
                config = cls.config_class(**sizes)
            except Exception:  # noqa: BLE001 - a config that refuses one of the names: defaults, then shrink
                config = cls.config_class()
            _shrink(config, sizes)
            torch.manual_seed(seed)
            model = cls(config).float().eval()
        except Exception as error:  # noqa: BLE001 - try the next class of the family
            first_error = first_error or error
            continue
        if any(isinstance(m, hooked) for m in model.modules()):
            _distinct_hash_experts(model)
            return model
    reason = f"{type(first_error).__name__}: {first_error}" if first_error else "none of them holds hooked experts"
    raise NoTinyModel(f"no tiny {family} model with hooked experts builds from {[c.__name__ for c in ranked]}: "
                      f"{reason}")


def logits_and_grads(model: torch.nn.Module, implementation: str, seed: int = 1):
    """(output [B, S, V or D], {name: grad}) of a fixed random input and loss under ``implementation``."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    out = model(input_ids=torch.randint(0, VOCAB, (2, 8), generator=gen), use_cache=False)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the experts hook ------------
# Families whose experts moe_mlp cannot compute, with the reason the fallback names, as of this
# transformers release (an older one may lack some of them, or not hook their experts yet):
# None in this release: Inkling-2's softcapped SwiGLU and MuseSpark's norm after each expert run
# the kernels too (see moe_restore.integration.experts).
FALLBACK_RELEASE = "5.25.0"
FALLBACK: dict[str, str] = {}


@pytest.fixture
def count_moe_mlp(monkeypatch):
    """The backends of the calls to moe_mlp (or its top-k entry ``moe_mlp_topk``) made by the
    integration (the experts hook in ``integration.experts`` and the rebuilt blocks of
    ``integration.hf_blocks``), in order: a list that fills while the test runs."""
    import moe_restore.integration.experts as experts_impl
    import moe_restore.integration.hf_blocks as hf_blocks

    calls = []
    for module in (experts_impl, hf_blocks):
        for name in ("moe_mlp", "moe_mlp_topk"):
            if not hasattr(module, name):
                continue

            def counted(*args, _real=getattr(module, name), **kwargs):
                calls.append(kwargs.get("backend"))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


# ---------------------------------------------------------------- replace_moe's families ------
# The families replace_moe supports (tests/integration/test_integration_replace*.py), built from their config
# classes at one tiny size of their own.
REPLACE_VOCAB = 64
REPLACE_SIZES = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=REPLACE_VOCAB, max_position_embeddings=32, bos_token_id=0,
                     eos_token_id=1, pad_token_id=None)


def replace_configs() -> dict[str, object]:
    """One tiny config per supported family; odd expert counts and top-k, both renormalisation rules."""
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**REPLACE_SIZES, num_local_experts=5, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**REPLACE_SIZES, moe_intermediate_size=12,
                                       shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=False),
        "qwen3_moe": tf.Qwen3MoeConfig(**REPLACE_SIZES, moe_intermediate_size=12, num_experts=5,
                                       num_experts_per_tok=3, norm_topk_prob=True, head_dim=8),
        "olmoe": tf.OlmoeConfig(**REPLACE_SIZES, num_experts=3, num_experts_per_tok=1, norm_topk_prob=False),
    }


def replace_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` (``replace_configs``), float32, in eval mode on DEVICE."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(replace_configs()[family]).float()
    with torch.no_grad():  # routers far from uniform, so no near-tie decides an expert by rounding
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    return model.to(DEVICE).eval()


def replace_tokens(seed: int = 1) -> torch.Tensor:
    """Two random sequences of 7 token ids, on DEVICE."""
    return torch.randint(0, REPLACE_VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor):
    """(output, language-model loss + 0.1 * the router's auxiliary loss) of ``ids`` as input and labels."""
    out = model(ids, labels=ids, output_router_logits=True)
    return out, out.loss + 0.1 * out.aux_loss


def _table() -> None:
    """Print docs/integration.md's family table: ``python tests/hf_tiny_models.py`` (torch backend)."""
    import warnings

    import moe_restore.integration.experts as experts_impl

    print("| family | experts class | relative error, logits | relative error, gradients (max) | moe_mlp |")
    print("|---|---|---|---|---|")
    for family in hook_families():
        try:
            model = tiny_model(family)
            y_ref, g_ref = logits_and_grads(model, "eager")
            experts_impl._warned.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, g = logits_and_grads(model, "moe_restore_torch")
        except Exception as error:  # noqa: BLE001 - a row that says why
            print(f"| {family} | | | | not built: {type(error).__name__} |")
            continue
        names = sorted({type(m).__name__ for m in model.modules() if any(is_hooked(c) for c in type(m).__mro__)})
        fallback = [str(w.message).split(": ", 2)[-1].split(";")[0] for w in caught if "moe_restore" in str(w.message)]
        err_g = max(relative_error(g[n], g_ref[n]) for n in g_ref)
        used = f"fallback: {fallback[0]}" if fallback else "ran"
        print(f"| {family} | {', '.join(names)} | {relative_error(y, y_ref):.1e} | {err_g:.1e} | {used} |")


if __name__ == "__main__":
    import moe_restore  # noqa: F401 - registers the implementations

    torch.set_num_threads(1)
    _table()

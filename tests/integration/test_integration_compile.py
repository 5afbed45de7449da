"""experts_implementation="moe_restore" under torch.compile(fullgraph=True), per family of the
installed transformers that uses the experts hook (tiny random models, ``hf_tiny_models``):

* the forward, compiled whole (backend "aot_eager"), equals the eager forward up to float32
  rounding (bitwise in the CI families; a family whose other layers the compiled graph computes
  in another order, e.g. inkling, differs by rounding);
* generation with a static cache, whose decoding steps transformers compiles with fullgraph=True
  (its ``CompileConfig``, here with "aot_eager" and allowed on the CPU), picks the tokens eager
  generation picks, with scores within float32 rounding (transformers' own "grouped_mm" shows the
  same ~6e-8 difference: it comes from the attention and the cache, not from the experts).

A family that does not compile with transformers' default ("grouped_mm") either is skipped with
that error (sparse-indexer attention, hybrid linear attention, ... are not compilable there);
one that compiles with the default and not with ours fails.

Cost: one compile per family takes 5-40 s on a CPU, so CI runs a representative subset
(``CI_FAMILIES``: the families issue 27 names, with DeepSeek-V3's MLA and group-limited router,
and GPT-OSS, which falls back to grouped_mm); ``MOE_RESTORE_TEST_ALL_FAMILIES=1 pytest tests/integration/test_integration_compile.py`` runs every
family (docs/integration.md gives the last full run).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

import moe_restore  # noqa: E402,F401 - registers the implementations
from hf_tiny_models import FALLBACK, NoTinyModel, count_moe_mlp, hook_families, relative_error, tiny_model  # noqa: E402,F401 - the fixture
from utils import backends  # noqa: E402

# The families of issue 27 and one that falls back to grouped_mm (gpt_oss: its own clamped gate).
CI_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "granitemoe", "gpt_oss"]
FAMILIES = hook_families() if os.environ.get("MOE_RESTORE_TEST_ALL_FAMILIES") == "1" else CI_FAMILIES
TOL = 1e-5


def _input_ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _compiled_forward(model, implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(compiled, eager) outputs of the whole forward under ``implementation``."""
    model.set_experts_implementation(implementation)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = [run(input_ids=_input_ids(), use_cache=False) for run in (compiled, model)]
    return tuple(o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state for o in out)


def _generations(model, implementation: str):
    """(compiled, eager) greedy generations of 4 tokens with a static cache under ``implementation``."""
    model.set_experts_implementation(implementation)
    ids = _input_ids()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static", return_dict_in_generate=True, output_scores=True)
    config = tf.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles the decoding steps on a CPU only when asked
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = model.generate(ids, compile_config=config, **kwargs)
        assert hasattr(model, "_compiled_call"), "generate did not compile the decoding steps"
        eager = model.generate(ids, disable_compile=True, **kwargs)
    return compiled, eager


def _model(family: str):
    try:
        return tiny_model(family)
    except NoTinyModel as error:
        pytest.skip(str(error))


def _skip_unless_the_default_compiles(model, run) -> None:
    """Called after ours failed to compile: skip if transformers' default fails too, else re-raise."""
    try:
        run(model, "grouped_mm")
    except Exception as error:  # noqa: BLE001 - any failure of the default is the family's own
        pytest.skip(f"does not compile with transformers' grouped_mm either: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}")
    raise


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_forward_equals_eager(family, count_moe_mlp):
    model = _model(family)
    try:
        got, want = _compiled_forward(model, "moe_restore_torch")
    except Exception:  # noqa: BLE001
        _skip_unless_the_default_compiles(model, _compiled_forward)
    assert relative_error(got, want) <= TOL
    assert bool(count_moe_mlp) == (family not in FALLBACK)  # the compiled graph holds moe_mlp (or grouped_mm)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_static_cache_generation_equals_eager(family):
    model = _model(family)
    if not model.can_generate():
        pytest.skip(f"{type(model).__name__} does not generate")
    try:
        compiled, eager = _generations(model, "moe_restore_torch")
    except Exception:  # noqa: BLE001
        _skip_unless_the_default_compiles(model, _generations)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert all(relative_error(a, b) <= TOL for a, b in zip(compiled.scores, eager.scores))


@pytest.mark.skipif("triton" not in backends(), reason="the Triton kernels need TRITON_INTERPRET=1 or a GPU")
def test_triton_backend_compiled_forward_and_generation():
    """The Triton path (custom ops) compiles the same way; one family, as the interpreter is slow."""
    model = tiny_model("qwen3_moe")
    got, want = _compiled_forward(model, "moe_restore_triton")
    assert torch.equal(got, want)
    compiled, eager = _generations(model, "moe_restore_triton")
    assert torch.equal(compiled.sequences, eager.sequences)
    assert all(relative_error(a, b) <= TOL for a, b in zip(compiled.scores, eager.scores))

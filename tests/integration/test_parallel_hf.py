"""transformers' own expert parallelism (``DistributedConfig(ep_size=2)``) with
``experts_implementation="moe_restore_torch"`` on 2 gloo processes (CPU): equal to "eager" and
"grouped_mm" under the same expert parallelism, logits and every gradient (fp32, rel <= 1e-5).

transformers 5.25 runs it on gloo: each rank keeps E/2 experts (``num_experts`` becomes the local
count) and reaches them through an ``EPImplementation``. "all_reduce" gives every rank the whole
batch and marks the routes to the other rank's experts with the sentinel id ``num_experts`` (the
local count) and weight 0, which ``distinct_slots`` folds away; "all_to_all" sends each route to its
expert's rank and calls the experts top-1 with local ids. Both are run; the sentinel ids are seen.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from hf_tiny_models import logits_and_grads, relative_error, tiny_model

pytest.importorskip("transformers")
import moe_restore  # noqa: E402,F401 - registers the implementations
import moe_restore.integration.experts as experts_impl  # noqa: E402
# Imported before the ranks are forked, so that they do not each import them again (seconds).
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from transformers.distributed import expert_parallel  # noqa: E402,F401

WORLD = 2
IMPLEMENTATIONS = ("eager", "grouped_mm", "moe_restore_torch")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _same_under_expert_parallelism(rank: int, world: int, path: str, single_logits: torch.Tensor) -> None:
    seen_ids = []
    real_distinct_slots = experts_impl.distinct_slots

    def spy(top_k_index, top_k_weights, num_experts):
        seen_ids.append((int(top_k_index.max()), num_experts))
        return real_distinct_slots(top_k_index, top_k_weights, num_experts)

    experts_impl.distinct_slots = spy
    for ep_implementation in ("all_reduce", "all_to_all"):
        config = DistributedConfig(tp_size=world, tp_plan={}, ep_size=world, ep_implementation=ep_implementation)
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32)
        experts = [m for m in model.modules() if getattr(m, "_is_expert_parallel", False)]
        assert experts and all(_local(m.gate_up_proj).shape[0] == m.num_experts for m in experts)
        results = {}
        for implementation in IMPLEMENTATIONS:
            seen_ids.clear()
            results[implementation] = logits_and_grads(model, implementation)
            # Ours ran, on the local experts; the all-reduce path hands it sentinel ids (= the local count).
            assert bool(seen_ids) == (implementation == "moe_restore_torch")
            if seen_ids and ep_implementation == "all_reduce":
                assert any(top == local for top, local in seen_ids)
        what = f"{ep_implementation}, rank {rank}"
        y_eager, grads_eager = results["eager"]
        assert relative_error(y_eager, single_logits) <= 1e-5, f"{what}: eager under EP vs one process"
        for implementation in IMPLEMENTATIONS[1:]:
            y, grads = results[implementation]
            assert relative_error(y, y_eager) <= 1e-5, f"{what}: {implementation} logits"
            assert grads.keys() == grads_eager.keys()
            for name, grad in grads.items():
                error = relative_error(_local(grad), _local(grads_eager[name]))
                assert error <= 1e-5, f"{what}: {implementation} gradient of {name}: {error:.2e}"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_restore_equals_eager_under_transformers_expert_parallelism(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    single_logits, _ = logits_and_grads(model, "eager")
    run_on_ranks(WORLD, _same_under_expert_parallelism, str(tmp_path), single_logits)

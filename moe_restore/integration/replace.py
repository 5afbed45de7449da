"""``replace_moe``: swap the sparse MoE blocks of a transformers model for kernel-backed blocks."""
from __future__ import annotations

import torch.nn as nn

from .hf_blocks import KNOWN_BLOCKS, KernelSparseMoeBlock, describe, qualified_name
from .report import IntegrationReport, NotConvertible, check_arguments, swap_modules


def _looks_like_moe_block(module: nn.Module) -> bool:
    """An MoE block this release does not know: an ``experts`` child, or a class named like one."""
    name = type(module).__name__
    named_like = "SparseMoe" in name or "SparseMLP" in name or name.endswith(("MoE", "Moe", "MoeBlock", "MoELayer"))
    return named_like or isinstance(getattr(module, "experts", None), nn.Module)


def replace_moe(model: nn.Module, *, backend: str | None = None) -> IntegrationReport:
    """Swap every known transformers sparse MoE block in ``model`` for a ``KernelSparseMoeBlock``.

    Known: Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE and OLMoE sparse MoE blocks
    (see ``hf_blocks``). The new block reuses the original block's parameters (views, no copy),
    applies the same routing rule and returns what the original returned, so outputs, gradients,
    state-dict names and the model's router-logits outputs stay as they were.

    The model is changed in place. Returns an ``IntegrationReport``: ``.model`` (the model),
    ``.replaced`` (one ``Change`` per swapped block) and ``.skipped`` (MoE-like blocks left alone,
    each with the reason, e.g. an unknown block class). ``backend`` is passed to the kernels.
    """
    check_arguments(model, backend)

    def convert(name: str, module: nn.Module):
        if isinstance(module, KernelSparseMoeBlock):
            raise NotConvertible("already replaced")
        if type(module).__module__.startswith("moe_restore."):
            return None  # this library's own layers run the kernels already
        rule = KNOWN_BLOCKS.get(qualified_name(type(module)))
        if rule is not None:
            block = KernelSparseMoeBlock(module, rule, backend)
            return block, describe(block)
        if _looks_like_moe_block(module):
            raise NotConvertible("unknown MoE block class; left as it was")
        return None

    return swap_modules(model, convert)

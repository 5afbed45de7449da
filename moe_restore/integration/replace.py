"""``replace_moe``: swap the sparse MoE blocks of a transformers model for kernel-backed blocks."""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch.nn as nn

from .hf_blocks import (KNOWN_BLOCKS, LEFT_ALONE, OTHER_BLOCKS, KernelSparseMoeBlock, describe, describe_other,
                        implementation_name, qualified_name, unwrapped)
from .experts import eager_forward
from .report import IntegrationReport, NotConvertible, check_arguments, swap_modules


def _looks_like_moe_block(module: nn.Module) -> bool:
    """An MoE block this release does not know: an ``experts`` child, or a class named like one."""
    name = type(module).__name__
    named_like = "SparseMoe" in name or "SparseMLP" in name or name.endswith(("MoE", "Moe", "MoeBlock", "MoELayer"))
    return named_like or isinstance(getattr(module, "experts", None), nn.Module)


def _hooked_experts(module: nn.Module) -> nn.Module | None:
    """The module's ``experts`` child (through PEFT's wrappers) if its class uses transformers'
    experts hook and its config can select an implementation, else None."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    experts = unwrapped(experts)
    if not hasattr(getattr(experts, "config", None), "_experts_implementation"):
        return None
    try:
        eager_forward(experts)
    except RuntimeError:
        return None
    return experts


def replace_moe(model: nn.Module, *, backend: str | None = None) -> IntegrationReport:
    """Swap every known transformers sparse MoE block in ``model`` for a ``KernelSparseMoeBlock``.

    Known: Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE and OLMoE sparse MoE blocks
    (see ``hf_blocks``). The new block reuses the original block's parameters (views, no copy),
    applies the same routing rule and returns what the original returned, so outputs, gradients,
    state-dict names and the model's router-logits outputs stay as they were. Blocks whose experts
    are outside transformers' experts hook: Llama 4's ``Llama4TextMoe``, DBRX's ``DbrxFFN`` and
    JetMoE's ``JetMoeMoE`` and Switch Transformers' ``SwitchTransformersSparseMLP`` become
    ``KernelLlama4TextMoe``, ``KernelDbrxFFN``, ``KernelJetMoeMoE`` and
    ``KernelSwitchTransformersSparseMLP`` (routing in torch as the stock block, experts on
    ``moe_mlp``). Any other block whose ``experts`` child uses the hook (DeepSeek-V2/V3,
    Jamba, PhiMoE, GraniteMoE, ERNIE-4.5-MoE, ...: the family's own routing, grouped top-k, score
    corrections and shared experts included) is kept and its experts are switched to
    ``experts_implementation="moe_restore"`` (``"moe_restore_<backend>"``); the report lists it as
    replaced, ``before == after``, with that detail.

    The model is changed in place. Returns an ``IntegrationReport``: ``.model`` (the model),
    ``.replaced`` (one ``Change`` per swapped block) and ``.skipped`` (MoE-like blocks left alone,
    each with the reason, e.g. an unknown block class). ``backend`` is passed to the kernels.
    Nothing is left alone silently: each skipped block, and a model where nothing was replaced,
    gives a ``UserWarning`` naming the module and the reason; the whole report is logged at INFO
    on the ``moe_restore.integration`` logger.

    When a block was replaced and ``model`` has a transformers config, the choice is recorded there
    as ``config.moe_restore = {"replace_moe": {"backend": backend}}``; ``save_pretrained`` writes it
    to config.json and ``from_pretrained`` (this module's) replays it on load.
    """
    check_arguments(model, backend)

    def convert(name: str, module: nn.Module):
        if isinstance(module, (KernelSparseMoeBlock, *OTHER_BLOCKS.values())):
            raise NotConvertible("already replaced")
        if type(module).__module__.startswith("moe_restore."):
            return None  # this library's own layers run the kernels already
        rule = KNOWN_BLOCKS.get(qualified_name(type(module)))
        if rule is not None:
            block = KernelSparseMoeBlock(module, rule, backend)
            return block, describe(block)
        other = OTHER_BLOCKS.get(qualified_name(type(module)))
        if other is not None:
            block = other(module, backend)
            return block, describe_other(block)
        if qualified_name(type(module)) in LEFT_ALONE:
            raise NotConvertible(LEFT_ALONE[qualified_name(type(module))])
        experts = _hooked_experts(module)
        if experts is not None:
            experts.config._experts_implementation = implementation_name(backend)
            return module, (f'kept, with its own routing; its experts ({type(experts).__name__}, transformers\' '
                            f'experts hook) run experts_implementation="{implementation_name(backend)}"')
        if _looks_like_moe_block(module):
            raise NotConvertible("unknown MoE block class; left as it was")
        return None

    report = swap_modules(model, convert)
    if not report.replaced and not report.skipped:
        report.note = ("no MoE block found: looked for transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                       "Llama 4, DBRX, JetMoE and Switch Transformers MoE blocks and for modules with an "
                       "`experts` child")
    for skip in report.skipped:
        warnings.warn(f"replace_moe: {skip.name or '<model>'} ({skip.kind}) left as it was: {skip.reason}",
                      stacklevel=2)
    if not report.replaced:
        warnings.warn(f"replace_moe replaced nothing in {type(model).__name__}: the model runs as before"
                      f"{'; ' + report.note if report.note else ''}", stacklevel=2)
    _log.info("replace_moe(%s): %s", type(model).__name__, report)
    config = getattr(report.model, "config", None)
    if report.replaced and callable(getattr(config, "to_dict", None)):
        setattr(config, CONFIG_KEY, {**(getattr(config, CONFIG_KEY, None) or {}), "replace_moe": {"backend": backend}})
    return report


CONFIG_KEY = "moe_restore"
_log = logging.getLogger("moe_restore.integration")


def from_pretrained(model_class: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)``, then
    ``replace_moe`` again with the recorded backend if the saved config records a ``replace_moe``
    (see ``replace_moe``): a model saved after ``replace_moe`` comes back replaced. A config
    without the record loads as it would with transformers alone, and transformers alone loads a
    replaced model's directory as the stock model (the parameters and their names are the same),
    its experts on the saved ``experts_implementation`` (``experts._save_our_implementation``:
    ``moe_restore`` must be imported, or ``experts_implementation=`` passed to override it).
    """
    load = getattr(model_class, "from_pretrained", None)
    if not callable(load):
        raise TypeError(f"model_class must have a from_pretrained method (a transformers model class), got "
                        f"{model_class!r}")
    model = load(pretrained_model_name_or_path, *args, **kwargs)
    recorded = (getattr(model.config, CONFIG_KEY, None) or {}).get("replace_moe")
    if recorded is not None:
        replace_moe(model, backend=recorded.get("backend"))
    return model

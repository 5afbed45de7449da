"""The sparse MoE blocks of ``transformers`` that ``replace_moe`` knows, and the block that replaces them.

Each known block routes tokens x [T, D] (hidden states flattened) as

    logits = x W_r^T                                (the model's own router module)
    p      = softmax(logits) in float32             (softmax before top-k)
    w, e   = top-k of p;  w /= sum_j w_j            (Mixtral always; Qwen2/3-MoE, OLMoE when
                                                    ``norm_topk_prob``)
    y      = sum_j w_j * down_e(silu(gate_e x) * up_e x)
           + sigmoid(x W_sg^T) * Shared(x)          (Qwen2-MoE only)

Qwen2/3-MoE and OLMoE round w to the logits dtype before use; Mixtral keeps it float32. The experts
are stored fused, ``gate_up_proj`` [E, 2H, D] (gate rows first) and ``down_proj`` [E, D, H], in an
experts class that uses transformers' experts hook. The replaced block calls that experts module
(``experts(x, e, w)``, the hook's contract) with ``experts_implementation="moe_restore"`` set on its
config, so ``moe_mlp`` runs on transposed views of the same Parameters (no copy, see ``experts``),
and whatever wraps the experts module applies as it does in the stock model: PEFT LoRA on the
expert Parameters (``target_parameters``: a parametrisation active inside the wrapper's forward),
accelerate's offload hooks (weights brought to the execution device around the forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_restore.kernels import topk_route

from .experts import IMPLEMENTATION, eager_forward
from .report import NotConvertible


@dataclass(frozen=True)
class BlockRule:
    """How one transformers block class routes (see the module docstring)."""

    always_renormalize: bool  # else the router's ``norm_topk_prob`` decides
    weights_in_logits_dtype: bool
    shared_expert: bool


_MODELS = "transformers.models."
KNOWN_BLOCKS: dict[str, BlockRule] = {
    _MODELS + "mixtral.modeling_mixtral.MixtralSparseMoeBlock": BlockRule(True, False, False),
    _MODELS + "qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": BlockRule(False, True, True),
    _MODELS + "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": BlockRule(False, True, False),
    _MODELS + "olmoe.modeling_olmoe.OlmoeSparseMoeBlock": BlockRule(False, True, False),
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _uses_silu(experts: nn.Module) -> bool:
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", None)
    if act is not None:
        return act in ("silu", "swish")
    return type(experts.act_fn).__name__ in ("SiLU", "SiLUActivation")


def unwrapped(experts: nn.Module) -> nn.Module:
    """The experts module inside wrappers that keep it as their base layer (PEFT's ``ParamWrapper``,
    nested once per targeted Parameter)."""
    get_base_layer = getattr(experts, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else experts


def _check_experts(experts: nn.Module) -> None:
    """Raise NotConvertible unless ``experts`` holds fused swiglu experts without biases behind
    transformers' experts hook."""
    experts = unwrapped(experts)
    for name in ("gate_up_proj", "down_proj", "act_fn"):
        if not hasattr(experts, name):
            raise NotConvertible(f"its experts module has no {name!r} (not the fused expert layout)")
    # Feature detection, not private attributes (transformers 5.17 has no ``_is_expert_parallel``):
    # the block calls the experts module, whose hooked forward dispatches on the config's
    # ``_experts_implementation``, so both the hook (found in the MRO) and that attribute must be there.
    if not hasattr(getattr(experts, "config", None), "_experts_implementation"):
        raise NotConvertible("its experts module has no config with `_experts_implementation`, so transformers' "
                             "experts hook cannot dispatch to the kernels")
    try:
        eager_forward(experts)
    except RuntimeError:
        raise NotConvertible("its experts class does not use transformers' experts hook "
                             "(@use_experts_implementation)") from None
    if experts.gate_up_proj.dim() != 3 or experts.down_proj.dim() != 3:
        raise NotConvertible("its expert weights are not [E, ., .] tensors (e.g. sharded or packed)")
    if experts.gate_up_proj.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotConvertible(f"its expert weights are {experts.gate_up_proj.dtype} (quantised); moe_mlp needs the "
                             "activations' float dtype")
    if getattr(experts, "has_bias", False):
        raise NotConvertible("its experts have biases, which this release does not map")
    if getattr(experts, "is_transposed", False):
        raise NotConvertible("its expert weights are stored transposed ([E, D, 2H]), not as these blocks store them")
    if not getattr(experts, "is_concatenated", True):
        raise NotConvertible("its gate and up projections are interleaved, not concatenated")
    if not _uses_silu(experts):
        raise NotConvertible("its experts' activation is not SiLU, so the expert MLP is not swiglu")


def implementation_name(backend: str | None) -> str:
    """The registered experts implementation that runs the kernels on ``backend``."""
    return IMPLEMENTATION if backend is None else f"{IMPLEMENTATION}_{backend}"


class KernelSparseMoeBlock(nn.Module):
    """A transformers sparse MoE block running ``topk_route`` and, through its experts module,
    ``moe_mlp`` (swiglu) on the original block's own modules.

    It keeps the original ``gate`` (router), ``experts`` and, for Qwen2-MoE, ``shared_expert`` and
    ``shared_expert_gate`` as its children, so the parameters, their names in the state dict and
    the model's router-logits recording are unchanged. The router module is called for its logits
    (its own top-k result is discarded: an O(T*E) extra, small next to the experts); the routing
    itself is ``topk_route``'s, handed to the experts module as (expert ids [T, k], weights [T, k]).
    Building the block sets the experts' config (the model's, shared by all its experts modules) to
    ``experts_implementation="moe_restore"`` (``"moe_restore_<backend>"`` for a pinned backend); a
    later ``model.set_experts_implementation(...)`` changes what computes the experts, not the
    routing. Returns what the original block returns: the hidden states, in the input's shape and
    dtype.
    """

    def __init__(self, block: nn.Module, rule: BlockRule, backend: str | None = None):
        super().__init__()
        _check_experts(block.experts)
        # The children in the original block's order, so that named_parameters() (hence an
        # optimizer's state, which is keyed by position) keeps its order.
        kept = ("gate", "experts") + (("shared_expert", "shared_expert_gate") if rule.shared_expert else ())
        for name in sorted(kept, key=list(block._modules).index):
            setattr(self, name, getattr(block, name))
        self.top_k = block.gate.top_k
        self.renormalize = rule.always_renormalize or bool(getattr(block.gate, "norm_topk_prob", False))
        self.weights_in_logits_dtype = rule.weights_in_logits_dtype
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0))
        if not rule.shared_expert:
            self.shared_expert = self.shared_expert_gate = None
        self.backend = backend
        self.source = type(block).__name__

    @property
    def backend(self) -> str | None:
        """The kernels' backend (None: by device), for ``topk_route`` and, through the experts'
        config, ``moe_mlp``."""
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        self._backend = backend
        unwrapped(self.experts).config._experts_implementation = implementation_name(backend)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative router jitter
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.gate(x)[0]
        routing = topk_route(logits, self.top_k, renormalize=self.renormalize, backend=self.backend)
        weights = routing.weights
        if self.weights_in_logits_dtype and logits.dtype != torch.float32:
            weights = weights.to(logits.dtype).float()
        y = self.experts(x, routing.experts, weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"source={self.source}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"shared_expert={self.shared_expert is not None}, backend={self.backend}")


def describe(block: KernelSparseMoeBlock) -> str:
    """The report's line for a replaced block."""
    experts = unwrapped(block.experts)
    shared = "; shared expert: the model's own MLP with its sigmoid gate" if block.shared_expert is not None else ""
    return (f"{experts.gate_up_proj.shape[0]} experts, swiglu, views of gate_up_proj/down_proj (no copy) through "
            f'the experts module (experts_implementation="{implementation_name(block.backend)}"); '
            f"softmax, top-{block.top_k}, {'renormalised' if block.renormalize else 'not renormalised'}{shared}")

"""Today's MoE baselines beside the eager loop, reading a TopKMoE's parameters (so every one computes
the same function): ``torch._grouped_mm`` written by hand, transformers' ``eager`` and
``grouped_mm`` experts implementations (``transformers.integrations.moe``), each when the installed
packages, the device and the dtype support it.

``torch._grouped_mm`` (torch 2.13): on the CPU float32, bfloat16 and float16, forward and backward,
with every row stride a multiple of 16 bytes (D, H and the output width multiples of 4 in float32,
8 in 16-bit types); no float64. On CUDA bfloat16 (and float32 where the build has it) on compute
capability 8.0 and above.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn

from moe_restore.layers import TopKMoE

from moe_restore.kernels.activations import activate

from .eager_moe import top_k


def routed(layer: TopKMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k]) of the eager loop's routing: softmax, top-k, renormalised."""
    return top_k(layer.router.logits(x).float().softmax(dim=-1), layer.router.top_k)


def grouped_mm_unsupported(layer: TopKMoE, x: torch.Tensor) -> str | None:
    """Why ``torch._grouped_mm`` cannot run this layer on x's device and dtype, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes float32, bfloat16 or float16, not {x.dtype}"
    w1, w2 = layer.experts.w1, layer.experts.w2
    widths = (w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2])
    if any(w * x.element_size() % 16 for w in widths):
        return f"torch._grouped_mm needs row strides of 16 bytes: widths {widths} in {x.dtype}"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "torch._grouped_mm needs CUDA compute capability 8.0"
    return None


def grouped_mm_topk_moe(layer: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """The routed experts with one ``torch._grouped_mm`` per layer: sort the assignments by expert,
    gather the tokens [T*k, D], two grouped GEMMs, weight, unsort and sum over the k choices."""
    weights, experts = routed(layer, x)
    T, k = experts.shape
    order = experts.reshape(-1).sort(stable=True).indices
    offsets = torch.bincount(experts.reshape(-1), minlength=layer.experts.num_experts).cumsum(0).to(torch.int32)
    expert_of = experts.reshape(-1)[order]
    z = torch._grouped_mm(x[order // k], layer.experts.w1, offs=offsets)
    if layer.experts.b1 is not None:
        z = z + layer.experts.b1[expert_of]
    out = torch._grouped_mm(activate(z, layer.experts.activation).contiguous(), layer.experts.w2, offs=offsets)
    if layer.experts.b2 is not None:
        out = out + layer.experts.b2[expert_of]
    scaled = out * weights.reshape(-1)[order, None]
    by_assignment = torch.empty_like(scaled).index_copy(0, order, scaled)
    return by_assignment.view(T, k, -1).sum(dim=1).to(x.dtype)


def _transformers_experts(layer: TopKMoE, implementation: str) -> nn.Module | None:
    """A transformers experts module (``use_experts_implementation``, weights [E, in, out], i.e.
    ``is_transposed=True``) whose weights are the layer's own tensors; None without transformers."""
    try:
        from transformers.activations import ACT2FN
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None
    gated = layer.experts.activation == "swiglu"

    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = layer.experts.num_experts
            activation = layer.experts.activation
            name = "silu" if gated else {"gelu_tanh": "gelu_pytorch_tanh"}.get(activation, activation)
            self.act_fn = ACT2FN[name]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            # transformers' eager pattern (its Experts example): a one-hot mask, one linear per hit expert.
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
                hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
            for (e,) in hit.tolist():
                slot, token = torch.where(mask[e])
                z = hidden_states[token] @ layer.experts.w1[e]
                if layer.experts.b1 is not None:
                    z = z + layer.experts.b1[e]
                h = self._apply_gate(z) if gated else self.act_fn(z)
                out = h @ layer.experts.w2[e]
                if layer.experts.b2 is not None:
                    out = out + layer.experts.b2[e]
                final.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(final.dtype))
            return final

    decorated = use_experts_implementation(Experts, is_transposed=True, has_bias=layer.experts.b1 is not None,
                                           has_gate=gated)
    experts = decorated(SimpleNamespace(_experts_implementation=implementation))
    # The parameters stay the layer's: plain attributes, so the module owns no copy.
    names = ("gate_up_proj", "down_proj") if gated else ("up_proj", "down_proj")
    for name, tensor in zip(names, (layer.experts.w1, layer.experts.w2)):
        object.__setattr__(experts, name, tensor)
    for name, tensor in zip([n + "_bias" for n in names], (layer.experts.b1, layer.experts.b2)):
        object.__setattr__(experts, name, tensor)
    return experts


def _transformers_topk_moe(layer: TopKMoE, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weights, chosen = routed(layer, x)
    return experts(x, chosen, weights.to(x.dtype))


def transformers_forward(layer: TopKMoE, implementation: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x -> the layer's routed experts through transformers' ``implementation`` ("eager",
    "grouped_mm", ...); None when transformers is not installed."""
    experts = _transformers_experts(layer, implementation)
    return None if experts is None else functools.partial(_transformers_topk_moe, layer, experts)

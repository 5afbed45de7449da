"""``experts_implementation="moe_restore"``: this library's grouped expert MLP as a transformers experts backend.

transformers (>= 5) routes the experts of most MoE families through one hook: an experts class
decorated with ``@use_experts_implementation`` calls the function registered under the model's
``config._experts_implementation`` as ``fn(experts, hidden_states [T, D], top_k_index [T, k],
top_k_weights [T, k])``, the family's own router having chosen the experts. Registered here, the
function (``"moe_restore"``; ``"moe_restore_torch"`` and ``"moe_restore_triton"`` pin the kernels'
backend) runs

    routing = routing_from_topk(top_k_index, top_k_weights, E)
    y       = moe_mlp(hidden_states, routing, w1, w2, b1, b2, activation=...)

on the experts' own Parameters in their own dtype, through views (no copy):

* ``gate_up_proj`` [E, 2I, D] (gate rows first: ``is_concatenated``) is w1 = ``gate_up_proj.transpose(1, 2)``
  [E, D, 2I], ``down_proj`` [E, D, I] is w2 = ``down_proj.transpose(1, 2)``; with ``is_transposed`` they are
  stored [E, D, 2I] and [E, I, D] already and are used as they are;
* the activation is ``act_fn(gate) * up`` with SiLU (an ACT2FN module or ``F.silu`` itself), i.e.
  moe_mlp's "swiglu"; experts without a gate (``has_gate=False``: ``up_proj``) take ``act_fn`` alone
  (SiLU, GELU, tanh-GELU or ReLU);
* biases (``has_bias``): b1 = ``gate_up_proj_bias`` (or ``up_proj_bias``), b2 = ``down_proj_bias``;
* slots that repeat an expert of their row or hold a sentinel id >= E (expert parallelism) are
  folded into distinct ids first (``distinct_slots``), the sum over slots unchanged.

Everything else (interleaved gate/up rows, a family's own ``_apply_gate`` such as GPT-OSS's clamped
SwiGLU, a gated activation other than SiLU, a post-expert norm, more slots than experts, quantised or
mixed-dtype weights) runs the family's eager forward instead, with a warning given once per reason.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

import torch
import torch.nn as nn

from moe_restore.kernels import moe_mlp, routing_from_topk

IMPLEMENTATION = "moe_restore"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


# The moe_mlp name of each activation module class and function. transformers' classes are added
# by ``register`` (when its experts hook is imported), never inside a forward: an import there
# breaks torch.compile(fullgraph=True) on torch 2.11.
_ACTIVATION_CLASSES: dict[type, str] = {nn.SiLU: "silu", nn.ReLU: "relu"}
_ACTIVATION_FUNCTIONS = {nn.functional.silu: "silu", nn.functional.gelu: "gelu", nn.functional.relu: "relu"}


def _activation_name(act_fn: object) -> str | None:
    """The moe_mlp activation that ``act_fn`` (a transformers ACT2FN module, or a plain
    ``torch.nn.functional`` function as in LFM2-MoE) computes, else None."""
    if callable(act_fn) and not isinstance(act_fn, nn.Module) and act_fn in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[act_fn]
    return _ACTIVATION_CLASSES.get(type(act_fn))


def _add_transformers_activations() -> None:
    from transformers import activations as hf_act

    _ACTIVATION_CLASSES.update({hf_act.SiLUActivation: "silu", hf_act.GELUActivation: "gelu",
                                hf_act.GELUTanh: "gelu_tanh", hf_act.NewGELUActivation: "gelu_tanh"})


def plan(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
         top_k_weights: torch.Tensor) -> tuple[str, tuple] | str:
    """(activation, (w1, w2, b1, b2)) for ``moe_mlp``, or the reason this call must run eagerly."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert is not supported"
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape:
        return (f"the call is not (hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]): got "
                f"{tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    num_experts = getattr(experts, "num_experts", None)
    if isinstance(num_experts, int) and top_k_index.shape[1] > num_experts:
        return f"it routes each token to {top_k_index.shape[1]} slots over {num_experts} experts (k > E)"
    activation = _activation_name(getattr(experts, "act_fn", None))
    gated = getattr(experts, "has_gate", True)
    if gated:
        if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
            return f"{type(experts).__name__} has its own gated activation (_apply_gate)"
        if not getattr(experts, "is_concatenated", True):
            return "its gate and up rows are interleaved, and moe_mlp's swiglu takes [gate | up]"
        if activation != "silu":
            return f"its gated activation is {type(experts.act_fn).__name__}(gate) * up; moe_mlp gates with SiLU only"
        activation = "swiglu"
    elif activation is None:
        return f"its activation {type(getattr(experts, 'act_fn', None)).__name__} is not one of moe_mlp's"
    prefix = "gate_up" if gated else "up"
    w1, w2 = getattr(experts, f"{prefix}_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in (w1, w2)):
        return f"its {prefix}_proj/down_proj are not [E, ., .] tensors"
    if not (w1.dtype == w2.dtype == hidden_states.dtype and w1.dtype in _FLOAT_DTYPES):
        return (f"its weights ({w1.dtype}, {w2.dtype}) and hidden states ({hidden_states.dtype}) do not share "
                "one float dtype")
    if not getattr(experts, "is_transposed", False):
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    b1 = b2 = None
    if getattr(experts, "has_bias", False):
        b1, b2 = getattr(experts, f"{prefix}_proj_bias", None), getattr(experts, "down_proj_bias", None)
    return activation, (w1, w2, b1, b2)


def _warn_once(experts: nn.Module, reason: str) -> None:
    key = f"{type(experts).__name__}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f'experts_implementation="{IMPLEMENTATION}": {key}; running the eager experts forward '
                      "instead", stacklevel=3)


def eager_forward(experts: nn.Module):
    """The family's own (eager) forward of ``experts``: the function that transformers' hook wraps.

    The hooked class is found in the MRO, since a subclass may override ``forward`` and call the
    hooked one through ``super()`` (Ergo's experts add a norm per route that way). Its dispatcher
    keeps the eager forward as ``functools.wraps``' ``__wrapped__`` or, failing that, in its
    closure (``original_forward``); a hook that keeps neither is reported, never guessed at."""
    for cls in type(experts).__mro__:
        dispatcher = cls.__dict__.get("forward")
        code = getattr(dispatcher, "__code__", None)
        if code is None or not code.co_filename.replace("\\", "/").endswith("integrations/moe.py"):
            continue
        original = getattr(dispatcher, "__wrapped__", None)
        if original is None and "original_forward" in code.co_freevars:
            original = dispatcher.__closure__[code.co_freevars.index("original_forward")].cell_contents
        if callable(original):
            return original
    raise RuntimeError(f"{type(experts).__name__}: no class in its MRO has transformers' experts hook with a "
                       "recoverable eager forward, so it cannot fall back to eager")


def distinct_slots(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert mixture as transformers' (ids, weights) [T, k], with the ids of every row
    distinct and in [0, E), as ``routing_from_topk`` requires; static shapes, no host read.

    transformers' experts contract sums every slot, and a slot may repeat an expert of its row
    (LongCat-Flash maps its zero-computation experts onto real ids with weight 0) or hold a
    sentinel id >= E (expert parallelism: another rank's expert, contributing nothing). Here the
    first slot of each expert carries the summed weight of all its row's slots with that id
    (sum_j w_j f_e(x) = (sum_j w_j) f_e(x), so every weight keeps its gradient f_e(x) . dy), and
    each other slot gets a constant weight 0 and an id its row does not use, taken from 0..k-1
    (with k <= E, at most k - #kept of those are used, and that many slots need one)."""
    T, k = top_k_index.shape
    ids = top_k_index.long()
    valid = (ids >= 0) & (ids < num_experts)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [T, k, k]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # [j, i]: i < j
    keep = valid & ~(same & earlier).any(-1)
    merged = (same.to(top_k_weights.dtype) * top_k_weights[:, None, :]).sum(-1)
    weights = torch.where(keep, merged, torch.zeros_like(merged))
    candidates = torch.arange(k, device=ids.device)
    taken = ((ids[:, :, None] == candidates) & keep[:, :, None]).any(1)  # [T, k candidates]
    free_rank = (~taken).long().cumsum(-1) - 1
    slot_rank = (~keep).long().cumsum(-1) - 1
    pick = ~taken[:, None, :] & (free_rank[:, None, :] == slot_rank[:, :, None])  # [T, slot, candidate]
    ids = torch.where(keep, ids, pick.long().argmax(-1))
    return ids, weights


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The experts forward registered with transformers (see the module docstring); ``backend`` as
    for the kernels (None: Triton where it runs, else torch)."""
    planned = plan(experts, hidden_states, top_k_index, top_k_weights)
    if isinstance(planned, str):
        _warn_once(experts, planned)
        return eager_forward(experts)(experts, hidden_states, top_k_index, top_k_weights)
    activation, (w1, w2, b1, b2) = planned
    ids, weights = distinct_slots(top_k_index, top_k_weights, w1.shape[0])
    routing = routing_from_topk(ids, weights, w1.shape[0], backend=backend)
    y = moe_mlp(hidden_states, routing, w1, w2, b1, b2, activation=activation, backend=backend)
    return y.to(hidden_states.dtype)


def _with_backend(backend: str | None):
    def forward(experts, hidden_states, top_k_index, top_k_weights):
        return experts_forward(experts, hidden_states, top_k_index, top_k_weights, backend)

    forward.__name__ = forward.__qualname__ = f"experts_forward_{backend or 'auto'}"
    return forward


# The registered names: "moe_restore" picks the backend by device; the other two pin one.
IMPLEMENTATIONS = {IMPLEMENTATION: _with_backend(None), f"{IMPLEMENTATION}_torch": _with_backend("torch"),
                   f"{IMPLEMENTATION}_triton": _with_backend("triton")}


_HOOK_MODULE = "transformers.integrations.moe"


def register() -> None:
    """Register ``IMPLEMENTATIONS`` with transformers' experts interface: now if transformers' experts
    hook is imported already, else as soon as it is (importing it here would add seconds to every
    ``import moe_restore``). Nothing happens where transformers is not installed. Idempotent."""
    module = sys.modules.get(_HOOK_MODULE)
    if module is not None:
        _add_transformers_activations()
        for name, forward in IMPLEMENTATIONS.items():
            module.ExpertsInterface.register(name, forward)
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers' experts hook so that ``register``
    runs right after that module has executed, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOK_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_and_register
        return spec

"""``experts_implementation="moe_restore"``: this library's grouped expert MLP as a transformers experts backend.

transformers (>= 5) routes the experts of most MoE families through one hook: an experts class
decorated with ``@use_experts_implementation`` calls the function registered under the model's
``config._experts_implementation`` as ``fn(experts, hidden_states [T, D], top_k_index [T, k],
top_k_weights [T, k])``, the family's own router having chosen the experts. Registered here, the
function (``"moe_restore"``; ``"moe_restore_torch"`` and ``"moe_restore_triton"`` pin the kernels'
backend) runs

    y = moe_mlp_topk(hidden_states, top_k_index, top_k_weights, w1, w2, b1, b2, activation=...)

(``moe_mlp`` of ``routing_from_topk(top_k_index, top_k_weights, E)``; on the torch backend in one
call, with no Routing built and the arguments checked once) on the experts' own Parameters in their own dtype, through views (no copy):

* ``gate_up_proj`` [E, 2I, D] (gate rows first: ``is_concatenated``) is w1 = ``gate_up_proj.transpose(1, 2)``
  [E, D, 2I], ``down_proj`` [E, D, I] is w2 = ``down_proj.transpose(1, 2)``; with ``is_transposed`` they are
  stored [E, D, 2I] and [E, I, D] already and are used as they are;
* the activation is ``act_fn(gate) * up`` with SiLU, GELU or tanh-GELU (an ACT2FN module or the
  ``torch.nn.functional`` function itself), i.e. moe_mlp's "swiglu", "geglu" or "geglu_tanh";
  experts without a gate (``has_gate=False``: ``up_proj``) take ``act_fn`` alone (SiLU, GELU,
  tanh-GELU, ReLU or squared ReLU);
* a family's own ``_apply_gate`` (GPT-OSS's clamped SwiGLU with its slope, ``up + 1`` and
  interleaved columns; DeepSeek-V4's and GLM-5-Next's clamp then SiLU; Step-3.7's SiLU then
  clamp; Inkling-2's softcapped SwiGLU, ...) runs as the ``ActivationSpec`` it computes: the
  candidate specs built from the module's ``limit``/``swiglu_limit`` and ``alpha``/``swiglu_alpha``
  and its ``act_fn``'s ``gate_softcap``/``up_softcap`` are probed against the family's own
  ``_apply_gate`` on values that cross every clamp, once per class and parameters, and the first
  that matches it (float32, 1e-6 relative) is used;
* biases (``has_bias``): b1 = ``gate_up_proj_bias`` (or ``up_proj_bias``), b2 = ``down_proj_bias``;
* slots that repeat an expert of their row (LongCat-Flash's zero experts) are computed as they
  are on the torch backend (``moe_mlp_topk``: every slot its own assignment, summed); where a slot may hold a sentinel id >= E (expert parallelism: the hook's
  ``_is_expert_parallel`` is not False), on the Triton path, which ranks an expert once per
  token, and with a norm after each expert, they are folded into distinct ids first
  (``distinct_slots``), the sum over slots unchanged;
* a norm after each expert (``has_post_expert_norm``: MuseSpark's ``post_expert_norm`` of each
  expert's D_out row, before the routing weight): ``moe_mlp`` computes the unweighted expert
  outputs of the [T*k, D] rows (each token once per slot, weight 1), and the norm, the weights and
  the sum over slots run in torch (``_with_post_expert_norm``). The grouped path tiles D_out
  across programs, so the norm cannot go into its epilogue; this costs the [T*k, D] input and
  [T*k, D_out] output that transformers' ``grouped_mm`` also materialises.

Everything else (an ``_apply_gate`` no spec matches; interleaved rows with the default gate;
another activation; more slots than experts; quantised or mixed-dtype weights)
runs what transformers would have run without us (``fallback_forward``: its ``"grouped_mm"``, else
its ``"batched_mm"``, the family's eager forward only where the installed transformers has
neither), with a warning given once per reason that names it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch
import torch.nn as nn

import moe_restore.kernels as moe_restore_kernels
from moe_restore.kernels import ActivationSpec, naive
from moe_restore.kernels.moe_mlp import moe_mlp_topk, resolve_backend as resolve_moe_mlp_backend

IMPLEMENTATION = "moe_restore"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


# The moe_mlp name of each activation module class and function. transformers' classes are added
# by ``register`` (which ``import moe_restore`` calls), never inside a forward: an import there
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
                                hf_act.GELUTanh: "gelu_tanh", hf_act.NewGELUActivation: "gelu_tanh",
                                hf_act.ReLUSquaredActivation: "relu2"})


# The gated kind whose gate function is each plain activation.
_GATED_KIND = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
_probed: dict[tuple, ActivationSpec | str] = {}


def _number(experts: nn.Module, names: tuple[str, ...]) -> float | None:
    """The first of the module's attributes ``names`` that holds a number, as a float."""
    for name in names:
        value = getattr(experts, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _softcap(module: object, name: str) -> float | None:
    """The softcap ``name`` of ``module`` (Inkling-2's act_fn): a number, or a submodule holding
    one as ``softcap``; None if absent or not > 0."""
    value = getattr(module, name, None)
    value = getattr(value, "softcap", value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _gate_candidates(experts: nn.Module, act_kind: str | None):
    """The specs the family's ``_apply_gate`` may compute, most likely first: the gate function of
    its ``act_fn`` (any gated kind without one), its slope and clamp limit, the clamp before or
    after the gate function, up offset 0 or 1, the columns as ``is_concatenated`` says or not; with
    no limit, the softcaps on its ``act_fn`` (``gate_softcap``: SwiGLU only, ``up_softcap``)."""
    limit = _number(experts, ("limit", "swiglu_limit"))
    limit = limit if limit is not None and limit > 0 else None
    alpha = _number(experts, ("alpha", "swiglu_alpha"))
    act_fn = getattr(experts, "act_fn", None)
    caps = (_softcap(act_fn, "gate_softcap"), _softcap(act_fn, "up_softcap")) if limit is None else (None, None)
    concatenated = getattr(experts, "is_concatenated", True)
    kinds = [_GATED_KIND[act_kind]] if act_kind in _GATED_KIND else list(_GATED_KIND.values())
    if caps[0] is not None:  # a gate softcap is SwiGLU's
        kinds = ["swiglu"]
    for kind in kinds:
        for slope in dict.fromkeys([alpha or 1.0, 1.0] if kind == "swiglu" else [1.0]):
            for clamp_after in ((False, True) if limit is not None else (False,)):
                for up_offset in (0.0, 1.0):
                    for interleaved in (not concatenated, concatenated):
                        yield ActivationSpec(kind, limit=limit, alpha=slope, up_offset=up_offset,
                                             interleaved=interleaved, clamp_after=clamp_after,
                                             gate_softcap=caps[0], up_softcap=caps[1])


def _apply_gate_spec(experts: nn.Module, act_kind: str | None) -> ActivationSpec | str:
    """The spec the family's own ``_apply_gate`` computes, or the reason none does (see the module
    docstring); probed once per class and parameters."""
    candidates = list(_gate_candidates(experts, act_kind))
    key = (type(experts), type(getattr(experts, "act_fn", None)), tuple(candidates))
    if key not in _probed and torch.compiler.is_compiling():  # the probe reads its result on the host
        return (f"{type(experts).__name__}'s own _apply_gate is matched to an activation spec by a probe that "
                "runs eagerly: one forward outside torch.compile first")
    if key not in _probed:
        spec = candidates[0]  # values on both sides of every clamp, and where every softcap bends
        scale = 3 * max(spec.limit or 2.0, spec.gate_softcap or 0.0, spec.up_softcap or 0.0)
        probe = torch.linspace(-scale, scale, 2 * 509, dtype=torch.float64)
        probe = probe[torch.randperm(probe.numel(), generator=torch.Generator().manual_seed(0))][None]
        name = type(experts).__name__
        try:
            with torch.no_grad():
                got = experts._apply_gate(probe.float()).double()
        except Exception as error:  # noqa: BLE001 - a gate that cannot run on a probe is not matched
            _probed[key] = f"{name}'s own _apply_gate failed on a probe ({type(error).__name__})"
        else:
            _probed[key] = next(
                (spec for spec in candidates if got.shape == (1, 509) and
                 ((got - naive.activate(probe, spec)).abs().max() <= 1e-6 * got.abs().max()).item()),
                f"{name}'s own _apply_gate (its gated activation) matches none of moe_mlp's activation specs")
    return _probed[key]


def plan(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
         top_k_weights: torch.Tensor) -> tuple[str | ActivationSpec, tuple] | str:
    """(activation, (w1, w2, b1, b2)) for ``moe_mlp``, or the reason the kernels cannot take this call."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(experts, "has_post_expert_norm", False) and not callable(getattr(experts, "post_expert_norm", None)):
        return "it declares a norm after each expert but has no post_expert_norm module"
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
            activation = _apply_gate_spec(experts, activation)
            if isinstance(activation, str):
                return activation
        elif not getattr(experts, "is_concatenated", True):
            return "its gate and up rows are interleaved, and its (default) gate takes [gate | up]"
        elif activation not in _GATED_KIND:
            return (f"its gated activation is {type(experts.act_fn).__name__}(gate) * up; moe_mlp gates with "
                    "SiLU, GELU or tanh-GELU")
        else:
            activation = _GATED_KIND[activation]
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


# What transformers runs when no experts implementation is asked for ("grouped_mm"), then the next
# best of its registry: the fallbacks, in order, before the family's eager forward.
FALLBACKS = ("grouped_mm", "batched_mm")


def _warn_once(experts: nn.Module, reason: str, fallback: str) -> None:
    """Warn once per experts class and reason. Not inside a torch.compile'd region, which cannot
    trace ``warnings.warn`` with fullgraph=True: the first eager call (e.g. generation's prefill)
    gives the warning."""
    key = f"{type(experts).__name__}: {reason}"
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(f'experts_implementation="{IMPLEMENTATION}": {key}; running transformers\' "{fallback}" '
                      "experts forward instead", stacklevel=3)


def fallback_forward(experts: nn.Module):
    """(name, forward) of what transformers would have run for ``experts`` without us: the first
    of ``FALLBACKS`` in its experts registry (``grouped_mm``, its default, handles every layout
    the hook declares and compiles), else the family's eager forward (``eager_forward``)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for name in FALLBACKS:
        forward = ALL_EXPERTS_FUNCTIONS.get(name)
        if forward is not None:
            return name, forward
    return "eager", eager_forward(experts)


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
        name, forward = fallback_forward(experts)
        _warn_once(experts, planned, name)
        return forward(experts, hidden_states, top_k_index, top_k_weights)
    activation, (w1, w2, b1, b2) = planned
    if getattr(experts, "has_post_expert_norm", False):
        ids, weights = distinct_slots(top_k_index, top_k_weights, w1.shape[0])
        return _with_post_expert_norm(experts, hidden_states, ids, weights, activation, (w1, w2, b1, b2), backend)
    backend = resolve_moe_mlp_backend(backend, hidden_states)
    if backend != "torch" or getattr(experts, "_is_expert_parallel", True) is not False:
        # A sentinel id may come (the hook's flag is not False: expert parallelism, or an older
        # transformers without it), or the Triton dispatch needs distinct ids: fold the slots.
        # Otherwise repeated ids need no fold: the torch backend computes every slot as its own
        # assignment and sums them, as the contract does; an id out of range is still refused.
        top_k_index, top_k_weights = distinct_slots(top_k_index, top_k_weights, w1.shape[0])
    y = moe_mlp_topk(hidden_states, top_k_index, top_k_weights, w1, w2, b1, b2, activation=activation,
                     backend=backend)
    return y.to(hidden_states.dtype)


def _with_post_expert_norm(experts: nn.Module, hidden_states: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                           activation, params: tuple, backend: str | None) -> torch.Tensor:
    """sum_j w_j norm(f_{e_j}(x)) (MuseSpark: a norm after each expert, before its routing weight).
    ``moe_mlp`` computes the unweighted expert outputs: each (token, slot) pair is one row of a
    [T*k, D] input routed to its expert with weight 1; the norm, the weights and the sum over the
    k slots run in torch on the [T*k, D_out] result."""
    T, k = ids.shape
    rows = hidden_states[:, None, :].expand(T, k, hidden_states.shape[1]).reshape(T * k, -1)
    ones = weights.new_ones(T * k, 1, dtype=torch.float32)
    out = experts.post_expert_norm(moe_mlp_topk(rows, ids.reshape(-1, 1), ones, *params, activation=activation,
                                                backend=backend))
    return (out.view(T, k, -1) * weights[..., None].to(out.dtype)).sum(1).to(hidden_states.dtype)


def _with_backend(backend: str | None):
    def forward(experts, hidden_states, top_k_index, top_k_weights):
        return experts_forward(experts, hidden_states, top_k_index, top_k_weights, backend)

    forward.__name__ = forward.__qualname__ = f"experts_forward_{backend or 'auto'}"
    return forward


# The registered names: "moe_restore" picks the backend by device; the other two pin one.
IMPLEMENTATIONS = {IMPLEMENTATION: _with_backend(None), f"{IMPLEMENTATION}_torch": _with_backend("torch"),
                   f"{IMPLEMENTATION}_triton": _with_backend("triton")}


_HOOK_MODULE = "transformers.integrations.moe"


# The config attribute that config.json keeps (transformers drops its own ``_experts_implementation``
# when saving, and reads a saved ``experts_implementation`` back into it when loading).
SAVED_ATTRIBUTE = "experts_implementation"


def _save_our_implementation() -> None:
    """Make a config whose experts implementation is one of ``IMPLEMENTATIONS`` keep it in
    config.json: ``PreTrainedConfig.to_dict`` (what ``save_pretrained`` writes, for every
    sub-config too) is wrapped to add ``"experts_implementation": <our name>``, which
    ``PreTrainedConfig.__init__`` reads back into ``_experts_implementation`` on load. transformers
    alone saves no implementation (``set_experts_implementation`` and ``from_pretrained(...,
    experts_implementation=)`` set the private ``_experts_implementation_internal``, which
    ``to_dict`` drops); other implementations stay unsaved, as there. Idempotent."""
    from transformers import PreTrainedConfig

    original = PreTrainedConfig.to_dict
    if getattr(original, "_moe_restore", False):
        return

    def to_dict(config) -> dict:
        out = original(config)
        current = config.__dict__.get("_experts_implementation_internal")
        if current in IMPLEMENTATIONS:
            out[SAVED_ATTRIBUTE] = current
        return out

    to_dict._moe_restore = True
    to_dict.__doc__, to_dict.__wrapped__ = original.__doc__, original
    PreTrainedConfig.to_dict = to_dict


def _checkout_root_on_path() -> bool:
    """Whether a source checkout's root is on ``sys.path``, where its folder ``kernels/`` (which
    is ``moe_restore.kernels``) shadows the top-level ``kernels`` package (see
    ``moe_restore.kernels``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(moe_restore_kernels.__file__)))
    return any(os.path.abspath(entry or os.curdir) == root for entry in sys.path)


def register() -> bool:
    """Register ``IMPLEMENTATIONS`` with transformers' experts interface, and make a config that
    selects one of them save it in config.json (``_save_our_implementation``, a wrap of
    ``PreTrainedConfig.to_dict``): both happen here and nowhere else. Imports transformers' experts
    hook (``transformers.integrations.moe``) to do so; where transformers is not installed, or is
    too old to have the hook, nothing happens and False is returned. ``import moe_restore`` calls
    it (see docs/integration.md); it is idempotent, so calling it again is harmless."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        module = importlib.import_module(_HOOK_MODULE)
    except ModuleNotFoundError as error:
        if error.name == "kernels" and _checkout_root_on_path():
            warnings.warn("moe_restore: experts_implementation=\"moe_restore\" is not registered with transformers: "
                          "this process has the repository root on sys.path, where the folder kernels/ stands in "
                          "for Hugging Face's `kernels` package, and transformers' experts hook failed to import "
                          "it. Run from outside the repository root (e.g. `pytest`, not `python -m pytest`)",
                          stacklevel=2)
            return False
        if error.name != _HOOK_MODULE:
            raise
        return False  # a transformers without the experts hook (< 5)
    _add_transformers_activations()
    _save_our_implementation()
    for name, forward in IMPLEMENTATIONS.items():
        module.ExpertsInterface.register(name, forward)
    return True

"""``upcycle_ffn``: turn dense feed-forward modules into MoE layers whose experts start as copies.

A dense MLP u -> linear2(act(linear1(u))) becomes a ``TopKMoE`` (or ``NestedMoE``) whose every
expert is that MLP (plus optional N(0, noise_std^2) noise on each copy): with equal experts the
renormalised routing weights sum to 1 per token, so the model computes what it computed before.

Recognised modules:

* diffusers ``FeedForward``: ``net = [act, Dropout, Linear(, Dropout)]`` with act ``GELU`` (exact
  or tanh-approximate), ``LinearActivation`` (silu) or ``SwiGLU`` (its [up | gate] projection rows
  are reordered to moe_mlp's [gate | up]);
* timm-style ``Mlp``: ``fc1``, ``act``, ``fc2`` (dropouts of p = 0 and an identity ``norm``);
* timm-style ``GluMlp``: ``fc1`` projecting to [x1 | x2], ``x1 * act(x2)`` (``gate_last``, rows
  reordered to [gate | up]) or ``act(x1) * x2``, ``fc2``; with SiLU that is swiglu;
* Llama-style gated MLPs: ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn`` SiLU, i.e.
  ``down(silu(gate(u)) * up(u))`` (gate and up stacked into one [gate | up] projection);
* transformers' ``fc1``, ``activation_fn``, ``fc2`` MLPs (``ViTMLP``, ``CLIPMLP``, ...), checked on a
  random probe to compute ``fc2(activation_fn(fc1(u)))``;
* transformers' split MLPs: an ``*Intermediate`` module (``dense``, ``intermediate_act_fn``) whose
  second Linear is its sibling ``output.dense`` (``BertOutput``, DPT's ``DPTViTOutput``: dense, dropout,
  the residual add, a norm). The intermediate module becomes the MoE layer and ``output.dense`` an
  ``Identity``, so ``output`` keeps its dropout, residual and norm; checked on a random probe that
  ``output`` applies ``dense`` to its first input before anything else;
* with ``match``: any selected module whose children are, in order, Linear, activation, Linear
  (Identity and p = 0 Dropout children are ignored), e.g. ``nn.Sequential(Linear, GELU, Linear)``.

Activations: GELU (exact or tanh), SiLU, ReLU, also as transformers' activation modules (and swiglu as
above). Anything else, a dropout with p > 0
inside the MLP, or a norm between the Linears leaves the module as it was, named in the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from moe_restore.kernels.validation import check_finite_non_negative, check_positive_int
from moe_restore.layers.topk_moe import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE

from .report import IntegrationReport, NotConvertible, check_arguments, swap_modules

@dataclass(frozen=True)
class FoundMLP:
    """A dense MLP found in a model, linear2(act(linear1(u))), in moe_mlp's terms (the model's own
    Linears; the layer ``moe_restore.layers.DenseMLP`` is another thing); ``note`` is anything the
    report must say; ``finish`` is run once the MoE layer has replaced the module (a change to a sibling)."""

    linear1: nn.Linear
    linear2: nn.Linear
    activation: str
    note: str = ""
    finish: Callable[[], None] | None = None


def _gelu(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise NotConvertible(f"GELU approximation {approximate!r} has no moe_mlp counterpart")
    return "gelu" if approximate == "none" else "gelu_tanh"


# transformers' activation modules (transformers.activations), by class name so that it need not be imported.
_HF_ACTIVATIONS = {"SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                   "NewGELUActivation": "gelu_tanh"}


def _activation(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return _gelu(act.approximate)
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if type(act).__module__.startswith("transformers.") and type(act).__name__ in _HF_ACTIVATIONS:
        return _HF_ACTIVATIONS[type(act).__name__]
    raise NotConvertible(f"activation {type(act).__name__} has no moe_mlp counterpart (GELU, SiLU, ReLU, SwiGLU)")


def _is_passthrough(module: nn.Module) -> bool:
    """An Identity, or a Dropout that drops nothing; raise for a dropout that does."""
    if isinstance(module, nn.Dropout):
        if module.p > 0:
            raise NotConvertible(f"dropout p={module.p} inside the MLP has no counterpart in the expert MLP")
        return True
    return isinstance(module, nn.Identity)


def _gate_first(proj: nn.Linear) -> nn.Linear:
    """A copy of a [up | gate] projection (diffusers SwiGLU) with its rows as [gate | up]."""
    out = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None,
                    device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        for mine, theirs in ((out.weight, proj.weight), (out.bias, proj.bias)):
            if mine is not None:
                up, gate = theirs.chunk(2, dim=0)
                mine.copy_(torch.cat([gate, up]))
    return out


def _stacked(gate: nn.Linear, up: nn.Linear) -> nn.Linear:
    """One Linear whose rows are [gate | up] (copies of the two projections' weights and biases)."""
    if (gate.bias is None) != (up.bias is None) or gate.weight.shape != up.weight.shape:
        raise NotConvertible("its gate and up projections differ in shape or in having a bias")
    out = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None,
                    device=gate.weight.device, dtype=gate.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([gate.weight, up.weight]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([gate.bias, up.bias]))
    return out


def _swiglu_act(act: nn.Module) -> None:
    if _activation(act) != "silu":
        raise NotConvertible(f"its gate activation is {type(act).__name__}; moe_mlp gates with SiLU only (swiglu)")


def _gated_mlp(mlp: nn.Module) -> FoundMLP:
    """Llama-style: down_proj(act_fn(gate_proj(u)) * up_proj(u))."""
    parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise NotConvertible("gate_proj/up_proj/down_proj are not nn.Linear")
    _swiglu_act(mlp.act_fn)
    return FoundMLP(_stacked(mlp.gate_proj, mlp.up_proj), mlp.down_proj, "swiglu",
                    "gate_proj and up_proj stacked as [gate | up]")


def _glu_mlp(mlp: nn.Module) -> FoundMLP:
    """timm-style GluMlp: fc1 -> [x1 | x2] -> x1 * act(x2) (gate_last) or act(x1) * x2 -> fc2."""
    if getattr(mlp, "chunk_dim", -1) != -1:
        raise NotConvertible(f"it splits fc1's output along dim {mlp.chunk_dim} (convolutional), not the features")
    dense = _timm_mlp(mlp)
    _swiglu_act(mlp.act)
    if dense.linear1.out_features % 2:
        raise NotConvertible(f"fc1 has an odd width {dense.linear1.out_features}, not two halves")
    if getattr(mlp, "gate_last", True):
        return FoundMLP(_gate_first(dense.linear1), dense.linear2, "swiglu", "fc1 rows reordered from [up | gate] "
                        "to [gate | up]")
    return FoundMLP(dense.linear1, dense.linear2, "swiglu")


def _probe(what: str, got: Callable[[torch.Tensor], torch.Tensor], want: Callable[[torch.Tensor], torch.Tensor],
           like: nn.Linear, modules: tuple[nn.Module, ...]) -> None:
    """Raise NotConvertible unless got(u) == want(u) on a random u [3, in_features of ``like``],
    run in eval mode (no dropout) without gradients."""
    modes = [m.training for m in modules]
    u = torch.randn(3, like.in_features, generator=torch.Generator().manual_seed(0)).to(like.weight)
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            a, b = got(u), want(u)
    except Exception as error:  # noqa: BLE001 - a module that is not of this kind: its reason, not a crash
        raise NotConvertible(f"{what}, checked on a random input, fails: {type(error).__name__}: {error}") from error
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise NotConvertible(f"{what}, checked on a random input, does not hold")


def _fc_mlp(mlp: nn.Module) -> FoundMLP:
    """transformers' fc1, activation_fn, fc2 MLP (ViTMLP, CLIPMLP, ...)."""
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        raise NotConvertible("fc1/fc2 are not nn.Linear")
    others = [n for n, m in mlp.named_children() if n not in ("fc1", "activation_fn", "fc2") and not _is_passthrough(m)]
    if others:
        raise NotConvertible(f"it has children other than fc1, activation_fn, fc2: {', '.join(others)}")
    activation = _activation(mlp.activation_fn)
    _probe("forward = fc2(activation_fn(fc1(u)))", mlp, lambda u: mlp.fc2(mlp.activation_fn(mlp.fc1(u))), mlp.fc1,
           (mlp,))
    return FoundMLP(mlp.fc1, mlp.fc2, activation)


def _split_mlp(intermediate: nn.Module, parent: nn.Module | None) -> FoundMLP:
    """An ``*Intermediate`` (dense, intermediate_act_fn) and its sibling ``output`` (dense first)."""
    output = getattr(parent, "output", None)
    if not isinstance(intermediate.dense, nn.Linear) or not isinstance(getattr(output, "dense", None), nn.Linear):
        raise NotConvertible("it and its sibling `output` have no nn.Linear `dense` (the split MLP's two Linears)")
    activation = _activation(intermediate.intermediate_act_fn)
    _probe("forward = intermediate_act_fn(dense(u))", intermediate,
           lambda u: intermediate.intermediate_act_fn(intermediate.dense(u)), intermediate.dense, (intermediate,))
    dense = output.dense
    residual = torch.randn(3, dense.out_features, generator=torch.Generator().manual_seed(1)).to(dense.weight)

    def without_dense(h: torch.Tensor) -> torch.Tensor:
        output.dense = nn.Identity()
        try:
            return output(dense(h), residual)
        finally:
            output.dense = dense

    _probe(f"{type(output).__name__} applying dense to its first input first", lambda h: output(h, residual),
           without_dense, dense, (output,))

    def finish() -> None:
        output.dense = nn.Identity()

    return FoundMLP(intermediate.dense, dense, activation, f"its second Linear is the sibling output.dense, now an "
                    f"Identity ({type(output).__name__} keeps the rest of its forward: dropout, residual add, norm)", finish)


def _feed_forward(ff: nn.Module) -> FoundMLP:
    """diffusers FeedForward: net = [act (with .proj), Dropout, Linear(, Dropout)]."""
    act, *rest = ff.net
    linears = [m for m in rest if not _is_passthrough(m)]
    if len(linears) != 1 or not isinstance(linears[0], nn.Linear):
        raise NotConvertible("its net is not [activation, Dropout, Linear(, Dropout)]")
    kind = type(act).__name__
    if kind == "GELU":
        return FoundMLP(act.proj, linears[0], _gelu(act.approximate))
    if kind == "LinearActivation":
        return FoundMLP(act.proj, linears[0], _activation(act.activation))
    if kind == "SwiGLU" and isinstance(act.activation, nn.SiLU):
        return FoundMLP(_gate_first(act.proj), linears[0], "swiglu",
                        "SwiGLU rows reordered from [up | gate] to [gate | up]")
    raise NotConvertible(f"{kind} (a gated GELU variant) has no moe_mlp counterpart")


def _timm_mlp(mlp: nn.Module) -> FoundMLP:
    """timm-style Mlp: fc1, act, drop1, norm, fc2, drop2."""
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        raise NotConvertible("fc1/fc2 are not nn.Linear (e.g. 1x1 convolutions)")
    for name in ("drop1", "norm", "drop2"):
        part = getattr(mlp, name, None)
        if part is not None and not _is_passthrough(part):
            raise NotConvertible(f"its {name} ({type(part).__name__}) is not an identity")
    return FoundMLP(mlp.fc1, mlp.fc2, _activation(mlp.act))


def _two_linear(module: nn.Module) -> FoundMLP:
    """Children Linear, activation, Linear in registration order (pass-through children ignored)."""
    core = [m for m in module.children() if not _is_passthrough(m)]
    if len(core) != 3 or not (isinstance(core[0], nn.Linear) and isinstance(core[2], nn.Linear)):
        raise NotConvertible("its children are not Linear, activation, Linear")
    return FoundMLP(core[0], core[2], _activation(core[1]))


def _known_kind(module: nn.Module) -> Callable[[nn.Module], FoundMLP] | None:
    """The reader of a recognised module (see the module docstring); a split MLP's reader also
    takes the module's parent."""
    cls = type(module)
    from_transformers = cls.__module__.startswith("transformers.")
    if cls.__name__ == "FeedForward" and cls.__module__.startswith("diffusers.") and hasattr(module, "net"):
        return _feed_forward
    timm_like = all(hasattr(module, a) for a in ("fc1", "act", "fc2"))
    if cls.__name__ == "GluMlp" and timm_like:
        return _glu_mlp
    if cls.__name__ == "Mlp" and timm_like:
        return _timm_mlp
    if cls.__name__.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _gated_mlp
    if from_transformers and cls.__name__.endswith(("MLP", "Mlp")) and all(
            hasattr(module, a) for a in ("fc1", "activation_fn", "fc2")):
        return _fc_mlp
    if from_transformers and cls.__name__.endswith("Intermediate") and all(
            hasattr(module, a) for a in ("dense", "intermediate_act_fn")):
        return _split_mlp
    return None


# What upcycle_ffn looks for without ``match``, for the report's note when it finds nothing.
_LOOKED_FOR = ("diffusers FeedForward, timm-style Mlp/GluMlp (fc1, act, fc2), Llama-style *MLP (gate_proj, "
               "up_proj, down_proj, act_fn), transformers' *MLP (fc1, activation_fn, fc2) and *Intermediate "
               "(dense, intermediate_act_fn) with a sibling output.dense")


def _check_widths(dense: FoundMLP) -> None:
    """linear1's output feeds linear2 (half of it for swiglu); else the module is not that MLP."""
    width = dense.linear1.out_features // (2 if dense.activation == "swiglu" else 1)
    if width != dense.linear2.in_features:
        raise NotConvertible(f"its first Linear gives {dense.linear1.out_features} features but the second takes "
                             f"{dense.linear2.in_features}" + (" (a gated MLP this release does not recognise?)"
                                                                 if dense.activation != "swiglu" else ""))


def _check_layout(num_experts, top_k, nested) -> tuple[int, int]:
    """(num_experts, top_k) of the MoE to build, checked against ``nested`` if given."""
    if nested is None:
        if num_experts is None or top_k is None:
            raise ValueError("num_experts and top_k are required (or nested=(groups, experts_per_group, "
                             "top_k_groups, top_k_experts))")
        return check_positive_int("num_experts", num_experts), check_positive_int("top_k", top_k)
    if not isinstance(nested, tuple) or len(nested) != 4:
        raise ValueError("nested must be a tuple (groups, experts_per_group, top_k_groups, top_k_experts), "
                         f"got {nested!r}")
    for name, value in zip(("groups", "experts_per_group", "top_k_groups", "top_k_experts"), nested):
        check_positive_int(f"nested {name}", value)
    groups, per_group, k_groups, k_experts = nested
    implied = groups * per_group, k_groups * k_experts
    for name, given, want in (("num_experts", num_experts, implied[0]), ("top_k", top_k, implied[1])):
        if given is not None and given != want:
            raise ValueError(f"{name}={given} disagrees with nested={nested} (which gives {want}); leave it out")
    return implied


def upcycle_ffn(model: nn.Module, *, num_experts: int | None = None, top_k: int | None = None,
                nested: tuple[int, int, int, int] | None = None,
                match: Callable[[str, nn.Module], bool] | None = None, noise_std: float = 0.0,
                backend: str | None = None) -> IntegrationReport:
    """Replace dense feed-forward modules of ``model`` by MoE layers whose experts are copies of them.

    Args:
        model: changed in place.
        num_experts, top_k: a ``TopKMoE`` with this many experts, top_k per token.
        nested: (groups, experts_per_group, top_k_groups, top_k_experts) for a ``NestedMoE``
            instead (num_experts and top_k may then be left out).
        match: ``match(qualified_name, module) -> bool`` selects the modules to upcycle (any
            two-Linear MLP, see the module docstring); default: every module of a kind the
            module docstring lists (FeedForward, Mlp, GluMlp, gated and transformers' MLPs).
        noise_std: std of the independent Gaussian noise added to each expert copy's weights
            (0: the model's function is kept exactly at initialisation).
        backend: the new layers' kernel backend.

    Returns an ``IntegrationReport``: ``.model``, ``.replaced`` (one ``Change`` per new layer) and
    ``.skipped`` (selected or recognised modules left as they were, with the reason); when neither
    lists anything, ``.note`` says what was looked for. The new
    layers' ``aux_loss`` (load balance) is set on each forward; add it to the training loss.
    """
    check_arguments(model, backend)
    if match is not None and not callable(match):
        raise TypeError(f"match must be a callable (name, module) -> bool, got {type(match).__name__}")
    check_finite_non_negative("noise_std", noise_std)
    experts, k = _check_layout(num_experts, top_k, nested)
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}

    def convert(name: str, module: nn.Module):
        if isinstance(module, (TopKMoE, NestedMoE)):
            return None
        kind = _known_kind(module)
        if match is not None:
            if not match(name, module):
                return None
            kind = kind or _two_linear
        elif kind is None:
            return None
        dense = _split_mlp(module, parents.get(id(module))) if kind is _split_mlp else kind(module)
        _check_widths(dense)
        options = dict(activation=dense.activation, backend=backend)
        if nested is None:
            layer = TopKMoE.from_dense(dense.linear1, dense.linear2, experts, k, noise_std, **options)
            layout = f"{experts} experts, top-{k}"
        else:
            layer = NestedMoE.from_dense(dense.linear1, dense.linear2, *nested, noise_std=noise_std, **options)
            layout = f"{nested[0]} groups x {nested[1]} experts, top-{nested[2]} groups x top-{nested[3]} experts"
        copies = "copies of the dense MLP" + (f" + N(0, {noise_std:g}^2) noise" if noise_std else "")
        note = f"; {dense.note}" if dense.note else ""
        if dense.finish is not None:
            dense.finish()
        return layer, f"{layout} ({copies}), {dense.activation}{note}"

    report = swap_modules(model, convert)
    if not report.replaced and not report.skipped:  # every selected module is in one of them
        report.note = ("no candidate FFN found: " + ("match selected no module" if match is not None else
                                                      f"looked for {_LOOKED_FOR}"))
    return report

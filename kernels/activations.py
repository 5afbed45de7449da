"""The expert MLP's activations, decided in one place: the names, their parameters (one
``ActivationSpec``), the code each kind has in the Triton kernels, and the PyTorch function of each
and its derivative.

``act(z)`` for the hidden layer z of an expert (see ``moe_mlp``), by kind:

    "gelu"        z * Phi(z)                        (exact, erf-based GELU)
    "gelu_tanh"   0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))   (diffusers' FeedForward GELU)
    "silu"        z * sigmoid(z)
    "relu"        max(z, 0)
    "relu2"       max(z, 0)^2                        (Primer's squared ReLU: Nemotron-H, Ergo)
    "swiglu"      f(gate) * up with f(g) = g sigmoid(alpha g)   (alpha = 1: SiLU)
    "geglu"       f(gate) * up with f = gelu        (exact)
    "geglu_tanh"  f(gate) * up with f = gelu_tanh   (Gemma's GELU-tanh gate)

The three gated kinds split z [.., 2H] into gate and up: the first H columns and the last H
("concatenated", the default), or even and odd columns (``interleaved``, GPT-OSS). Their
parameters, as the transformers families that use them write their ``_apply_gate``:

    limit        None, or L > 0: the gate is clamped to (-inf, L] and up to [-L, L]
    clamp_after  the gate's clamp applies to f(gate) instead of to gate (Bailing-hybrid, Step-3.7)
    alpha        the sigmoid's slope in swiglu (GPT-OSS: 1.702)
    up_offset    h = f(gate) * (up + up_offset) (GPT-OSS: 1)
    gate_softcap None, or S_g > 0 (swiglu only): f(g) = S_g tanh(g / S_g) sigmoid(alpha g), the
                 linear factor of SiLU softcapped while the sigmoid sees the raw gate (Inkling-2)
    up_softcap   None, or S_u > 0: up enters as S_u tanh(up / S_u) (Inkling-2)

so h = c_a(f(c_g(gate))) * (s_u(clamp(up, -L, L)) + up_offset), c_g the gate clamp unless
``clamp_after``, c_a the clamp with it, s_u the up softcap (identity without one). A clamped
value's gradient is zero outside its range (as torch.clamp's: at the bound itself it passes). A
spec takes a clamp limit or softcaps, not both (no family combines them).

A spec is written anywhere a name is accepted, as an ``ActivationSpec`` or as its canonical string
(``str(spec)``: the kind alone with default parameters, else e.g.
``"swiglu(limit=7.0,alpha=1.702,up_offset=1.0,interleaved=True)"``), which is what the custom ops
carry. Everything that asks "which activation" (the op's validation, the Triton launches, the torch
backend, the layers' parameter shapes, the benchmarks' eager baselines) reads this module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Union

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu", "swiglu", "relu", "relu2", "geglu", "geglu_tanh")
GATED = frozenset({"swiglu", "geglu", "geglu_tanh"})
# A gated kind's gate function, as the plain kind of the same name.
_GATE_OF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}

# The constexpr ``ACT`` of the Triton kernels (``_moe_mlp_tiles``). A gated kind's code is
# GATED_BASE + its gate function's code, so the kernels test ``ACT >= GATED_BASE`` and take the
# gate function as ``ACT - GATED_BASE``.
GATED_BASE = 16
_PLAIN_CODES = {"gelu": 1, "silu": 2, "relu": 3, "gelu_tanh": 5, "relu2": 6}
TRITON_CODES: dict[str, int] = {**_PLAIN_CODES, **{k: GATED_BASE + _PLAIN_CODES[g] for k, g in _GATE_OF.items()}}

_PARAMETERS = ("limit", "alpha", "up_offset", "interleaved", "clamp_after", "gate_softcap", "up_softcap")


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """One activation and its parameters (see the module docstring); validated on construction."""

    kind: str
    limit: float | None = None
    alpha: float = 1.0
    up_offset: float = 0.0
    interleaved: bool = False
    clamp_after: bool = False
    gate_softcap: float | None = None
    up_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} (or an ActivationSpec of one), "
                             f"got {self.kind!r}")
        optional = tuple(name for name in ("limit", "gate_softcap", "up_softcap") if getattr(self, name) is not None)
        for name in ("alpha", "up_offset") + optional:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"activation {name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("gate_softcap", "up_softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"activation {name} must be > 0 (x -> {name} tanh(x / {name})), "
                                 f"got {getattr(self, name)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"activation limit must be > 0 (it clamps up to [-limit, limit]), got {self.limit}")
        for name in ("interleaved", "clamp_after"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"activation {name} must be a bool, got {getattr(self, name)!r}")
        if self.kind not in GATED and self._changed():
            raise ValueError(f"{self.kind!r} is not gated: {', '.join(_PARAMETERS)} apply to {sorted(GATED)} only")
        if self.alpha != 1.0 and self.kind != "swiglu":
            raise ValueError(f"alpha (the sigmoid's slope) applies to swiglu only, got {self.kind!r}")
        if self.clamp_after and self.limit is None:
            raise ValueError("clamp_after needs a limit")
        if self.gate_softcap is not None and self.kind != "swiglu":
            raise ValueError(f"gate_softcap (SiLU's linear factor softcapped) applies to swiglu only, got {self.kind!r}")
        if self.limit is not None and (self.gate_softcap is not None or self.up_softcap is not None):
            raise ValueError("an activation takes a clamp limit or softcaps, not both")

    def _changed(self) -> list[str]:
        """"name=value" of every parameter that differs from its default."""
        return [f"{name}={getattr(self, name)!r}" for name in _PARAMETERS
                if getattr(self, name) != getattr(ActivationSpec, name)]

    @property
    def gated(self) -> bool:
        """Whether the first layer holds gate and up (2H columns) for a hidden width H."""
        return self.kind in GATED

    def __str__(self) -> str:
        changed = self._changed()
        return f"{self.kind}({','.join(changed)})" if changed else self.kind

    def triton_constexprs(self) -> dict:
        """The kernels' constexpr arguments (``_moe_mlp_tiles``): ACT, LIMIT (None: no clamp),
        ALPHA, UP_OFFSET, CLAMP_AFTER, INTERLEAVED, GATE_SOFTCAP and UP_SOFTCAP (None: none)."""
        return dict(ACT=TRITON_CODES[self.kind], LIMIT=self.limit, ALPHA=self.alpha, UP_OFFSET=self.up_offset,
                    CLAMP_AFTER=self.clamp_after, INTERLEAVED=self.interleaved, GATE_SOFTCAP=self.gate_softcap,
                    UP_SOFTCAP=self.up_softcap)


Activation = Union[str, ActivationSpec]


@functools.lru_cache(maxsize=256)
def _parse(text: str) -> ActivationSpec:
    kind, paren, rest = text.partition("(")
    if not paren:
        return ActivationSpec(kind)
    if not rest.endswith(")"):
        raise ValueError(f"activation {text!r}: expected kind(name=value,...)")
    values: dict = {}
    for item in filter(None, rest[:-1].split(",")):
        name, eq, value = item.partition("=")
        if not eq or name not in _PARAMETERS or name in values:
            raise ValueError(f"activation {text!r}: {item!r} is not one of {_PARAMETERS} as name=value")
        constants = {"True": True, "False": False, "None": None}
        try:
            values[name] = constants[value] if value in constants else float(value)
        except ValueError:
            raise ValueError(f"activation {text!r}: {item!r} has no number, bool or None") from None
    return ActivationSpec(kind, **values)


def activation_spec(activation: object) -> ActivationSpec:
    """``activation`` (a name, a spec's canonical string or an ``ActivationSpec``) as a spec;
    ValueError if it names none."""
    if isinstance(activation, ActivationSpec):
        return activation
    if not isinstance(activation, str):
        raise ValueError(f"activation must be one of {ACTIVATIONS} or an ActivationSpec, got {activation!r}")
    # A plain name is a dictionary look-up: torch.compile (Dynamo of torch 2.11) cannot trace the
    # spec's construction (``math.isfinite`` in its validation) inside a fullgraph forward.
    return _PLAIN_SPECS[activation] if activation in _PLAIN_SPECS else _parse(activation)


_PLAIN_SPECS = {name: ActivationSpec(name) for name in ACTIVATIONS}


def check_activation(activation: object) -> str:
    """The canonical string of ``activation`` (a plain name stays itself), else ValueError."""
    if isinstance(activation, str) and activation in _PLAIN_SPECS:  # the ops' per-call case: no spec built
        return activation
    return str(activation_spec(activation))


def is_gated(activation: Activation) -> bool:
    """Whether the first layer holds gate and up (2H columns) for a hidden width H."""
    return activation_spec(activation).gated


def first_layer_width(activation: Activation, hidden: int) -> int:
    """Columns of w1 (and b1) for hidden width H: 2H for a gated activation, else H."""
    return 2 * hidden if is_gated(activation) else hidden


def _split(z: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return (z[..., 0::2], z[..., 1::2]) if spec.interleaved else z.chunk(2, dim=-1)


def _join(gate: torch.Tensor, up: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    return torch.stack([gate, up], dim=-1).flatten(-2) if spec.interleaved else torch.cat([gate, up], dim=-1)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) = erfc(-z / sqrt 2) / 2 in float32 or float64 (float16/bfloat16 computed in float32).
    The erfc form keeps its relative accuracy in the negative tail, where F.gelu's
    (1 + erf(z / sqrt 2)) / 2 cancels: at z = -3.6 in float32 gelu's relative error is 6.6e-5 that
    way and 3.9e-8 this way."""
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return 0.5 * torch.special.erfc(z * -math.sqrt(0.5))


def _plain(z: torch.Tensor, kind: str, alpha: float = 1.0) -> torch.Tensor:
    if kind == "silu":
        return F.silu(z) if alpha == 1.0 else z * torch.sigmoid(alpha * z)
    if kind == "gelu":
        return (z * _normal_cdf(z)).to(z.dtype)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if kind == "relu":
        return F.relu(z)
    return F.relu(z).square()  # relu2


def _plain_backward(dh: torch.Tensor, z: torch.Tensor, kind: str, alpha: float = 1.0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """act'(z) dh, written into ``out`` where given (a view of a wider buffer: no copy after)."""
    if kind == "silu":
        if alpha == 1.0:
            return _into(torch.ops.aten.silu_backward, out, dh, z)
        s = torch.sigmoid(alpha * z)  # d/dz z s(alpha z) = s (1 + alpha z (1 - s))
        return torch.mul(dh * s, 1 + alpha * z * (1 - s), out=out)
    if kind == "gelu":  # d/dz z Phi(z) = Phi(z) + z phi(z), computed in Phi's dtype, rounded to dh's
        cdf = _normal_cdf(z)
        zf = z.to(cdf.dtype)
        derivative = cdf + zf * torch.exp(-0.5 * zf * zf) * (1 / math.sqrt(2 * math.pi))
        # one pass: the product in Phi's dtype, rounded to dh's as it is stored
        return torch.mul(dh, derivative, out=torch.empty_like(dh) if out is None else out)
    if kind == "gelu_tanh":
        return _into(torch.ops.aten.gelu_backward, out, dh, z, approximate="tanh")
    if kind == "relu":
        return _into(torch.ops.aten.threshold_backward, out, dh, z, 0)
    return _into(torch.ops.aten.threshold_backward, out, 2 * z * dh, z, 0)  # relu2: 2 max(z, 0)


def _into(op, out: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """A backward op (silu_backward, gelu_backward, threshold_backward) into ``out``, by its
    ``grad_input`` overload, or into a new tensor."""
    return op.default(*args, **kwargs) if out is None else op.grad_input(*args, **kwargs, grad_input=out)


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


def _gate_parts(z: torch.Tensor, spec: ActivationSpec):
    """(gate, f(c_g(gate)) before the clamp after, c_a of it, up, up factor) of a gated z."""
    gate, up = _split(z, spec)
    limit = spec.limit
    gate_in = gate.clamp(max=limit) if limit is not None and not spec.clamp_after else gate
    if spec.gate_softcap is not None:
        f = _softcap(gate_in, spec.gate_softcap) * torch.sigmoid(spec.alpha * gate_in)
    else:
        f = _plain(gate_in, _GATE_OF[spec.kind], spec.alpha)
    f_out = f.clamp(max=limit) if spec.clamp_after else f
    up_c = up.clamp(-limit, limit) if limit is not None else up
    up_c = _softcap(up_c, spec.up_softcap) if spec.up_softcap is not None else up_c
    return gate, gate_in, f, f_out, up, up_c + spec.up_offset if spec.up_offset else up_c


def activate(z: torch.Tensor, activation: Activation) -> torch.Tensor:
    """act(z) in PyTorch (see the module docstring); for a gated spec z holds gate and up on the last axis."""
    spec = activation_spec(activation)
    if not spec.gated:
        return _plain(z, spec.kind)
    _, _, _, f_out, _, up_factor = _gate_parts(z, spec)
    return f_out * up_factor


def activate_and_backward(dh: torch.Tensor, z: torch.Tensor, activation: Activation
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), dz = act'(z) dh) for ``activate``, from one pass over z (gated: d gate =
    f'(gate) (up + up_offset) dh and d up = f(gate) s_u'(up) dh, each zero where its clamp cut;
    s_u'(u) = 1 - tanh(u / S_u)^2, and with a gate softcap f'(g) = (1 - tanh(g / S_g)^2)
    sigmoid(alpha g) + S_g tanh(g / S_g) alpha s (1 - s), s = sigmoid(alpha g))."""
    spec = activation_spec(activation)
    if not spec.gated:
        return _plain(z, spec.kind), _plain_backward(dh, z, spec.kind)
    gate, gate_in, f, f_out, up, up_factor = _gate_parts(z, spec)
    # Eager: both halves are written into one dz (no join copy), each chain ending in an op with
    # an out. Dynamo takes no out= into a strided view: compiled, the halves are joined.
    dz = None if torch.compiler.is_compiling() else torch.empty_like(z)
    d_gate, d_up = (None, None) if dz is None else _split(dz, spec)
    limit = spec.limit
    up_scale = f_out
    if limit is not None:
        up_scale = up_scale * ((up >= -limit) & (up <= limit))
    if spec.up_softcap is not None:
        up_scale = up_scale * (1 - torch.tanh(up / spec.up_softcap).square())
    d_up = torch.mul(dh, up_scale, out=d_up)
    # d gate's half holds dh (up + up_offset) until f' multiplies it in place: no [N, H] temporary
    d_f = torch.mul(dh, up_factor, out=d_gate)
    if limit is not None:  # the clamp's 0/1 factor; before f' (not clamp_after) or after, the same
        d_f = d_f.mul_((f <= limit) if spec.clamp_after else (gate <= limit))
    if spec.gate_softcap is not None:
        t, s = torch.tanh(gate_in / spec.gate_softcap), torch.sigmoid(spec.alpha * gate_in)
        d_gate = torch.mul(d_f, (1 - t.square()) * s + spec.gate_softcap * t * spec.alpha * s * (1 - s), out=d_gate)
    else:
        d_gate = _plain_backward(d_f, gate_in, _GATE_OF[spec.kind], spec.alpha, out=d_gate)
    # f_out is this call's own tensor and read for the last time: act(z) takes its memory
    return f_out.mul_(up_factor), dz if dz is not None else _join(d_gate, d_up, spec)


def triton_code(activation: Activation) -> int:
    """The kernels' constexpr ``ACT`` of ``activation``'s kind."""
    return TRITON_CODES[activation_spec(activation).kind]


def triton_constexprs(activation: Activation) -> dict:
    """The kernels' constexpr arguments of ``activation`` (``ActivationSpec.triton_constexprs``)."""
    return activation_spec(activation).triton_constexprs()

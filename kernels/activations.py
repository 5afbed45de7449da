"""The expert MLP's activations, decided in one place: the names, the code each name has in the
Triton kernels, and the PyTorch function of each name and its derivative.

``act(z)`` for the hidden layer z of an expert (see ``moe_mlp``):

    "gelu"       z * Phi(z)                        (exact, erf-based GELU)
    "gelu_tanh"  0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))   (diffusers' FeedForward GELU)
    "silu"       z * sigmoid(z)
    "relu"       max(z, 0)
    "swiglu"     silu(gate) * up, with z = [gate | up] (2H columns: the gate first)

Everything that asks "which activation" (the op's validation, the Triton launches, the torch
backend, the layers' parameter shapes, the benchmarks' eager baselines) reads this module.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _swiglu(z: torch.Tensor) -> torch.Tensor:
    gate, up = z.chunk(2, dim=-1)
    return F.silu(gate) * up


_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "swiglu": _swiglu,
    "relu": F.relu,
}

ACTIVATIONS: tuple[str, ...] = tuple(_FUNCTIONS)

# The constexpr ``ACT`` of the Triton kernels (``_moe_mlp_tiles._activation``); 4 is the one
# gated activation, whose first layer has two halves.
TRITON_CODES: dict[str, int] = {"gelu": 1, "silu": 2, "relu": 3, "swiglu": 4, "gelu_tanh": 5}
GATED = frozenset({"swiglu"})


def check_activation(activation: object) -> str:
    """Return ``activation`` if it names an activation, else raise ValueError listing the names."""
    if activation not in _FUNCTIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation  # type: ignore[return-value]


def is_gated(activation: str) -> bool:
    """Whether the first layer holds [gate | up] (2H columns) for a hidden width H."""
    return check_activation(activation) in GATED


def first_layer_width(activation: str, hidden: int) -> int:
    """Columns of w1 (and b1) for hidden width H: 2H for a gated activation, else H."""
    return 2 * hidden if is_gated(activation) else hidden


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) in PyTorch (see the module docstring); for "swiglu" z = [gate | up] on the last axis."""
    return _FUNCTIONS[check_activation(activation)](z)


def activation_backward(dh: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """dz = act'(z) dh for ``activate`` (swiglu: d gate = silu'(gate) up dh, d up = silu(gate) dh)."""
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * F.silu(gate)], dim=-1)
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(dh, z, approximate="none" if activation == "gelu" else "tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(dh, z)
    return torch.ops.aten.threshold_backward(dh, z, 0)


def triton_code(activation: str) -> int:
    """The kernels' constexpr code of ``activation``."""
    return TRITON_CODES[check_activation(activation)]

"""The experts of a MoE: the protocol any experts module follows, the routed bank ``ExpertMLPs``
and the dense shared expert ``DenseMLP``.

Experts protocol (what ``MoE`` checks): attributes ``num_experts``, ``dim`` and ``out_dim`` (ints), and
``forward(tokens [T, dim], routing: Routing) -> [T, out_dim]`` computing

    y[t] = sum_j w[t, j] * Expert_{e[t, j]}(tokens[t])       (w, e: routing.weights, routing.experts)

``ExpertMLPs`` holds E two-layer MLPs in the layout of ``moe_mlp`` and runs them through it:

    Expert_e(u) = act(u @ w1[e] + b1[e]) @ w2[e] + b2[e]
    w1 [E, D, H] (swiglu: [E, D, 2H], gate columns first), b1 [E, H or 2H], w2 [E, H, D_out], b2 [E, D_out]

``DenseMLP`` is one MLP every token goes through, in torch ops (no routing, no host sync):

    Dense(u) = act(u @ w1 + b1) @ w2 + b2      w1 [D, H] (swiglu: [D, 2H], [gate | up]), w2 [H, D_out]

S shared experts of width H are one DenseMLP of width S*H: the activation acts on each hidden unit
alone, so sum_s act(u W1_s) W2_s = act(u [W1_1 .. W1_S]) [W2_1; ..; W2_S] (for swiglu the gate columns
of all S experts first, then their up columns), and the S output biases add up to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe_restore.kernels import Routing, moe_mlp
from moe_restore.kernels.activations import activate, activation_spec, check_activation, first_layer_width
from moe_restore.kernels.validation import check_backend, check_finite_non_negative, check_positive_int


def dense_mlp_dims(linear1: nn.Linear, linear2: nn.Linear, activation: str) -> tuple[int, int, int, bool]:
    """(dim, hidden_dim, out_dim, bias) of the dense MLP linear2(act(linear1(u))) to upcycle.

    For swiglu, linear1 maps D to 2H: the first H outputs are the gate, the last H the up projection.
    """
    for name, linear in (("linear1", linear1), ("linear2", linear2)):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} must be a torch.nn.Linear, got {type(linear).__name__}")
    hidden = linear2.in_features
    expected = first_layer_width(activation, hidden)
    if linear1.out_features != expected:
        raise ValueError(f"linear2 takes {hidden} inputs, so linear1 must have {expected} outputs"
                         f"{f' (gate and up, for {activation})' if expected != hidden else ''}, "
                         f"got {linear1.out_features}")
    bias = linear1.bias is not None or linear2.bias is not None
    return linear1.in_features, hidden, linear2.out_features, bias


EXPERTS_PROTOCOL = ("num_experts", "dim", "out_dim")


def check_experts(experts: object) -> None:
    """Raise TypeError naming what ``experts`` lacks of the experts protocol (module docstring)."""
    if not isinstance(experts, nn.Module):
        raise TypeError(f"experts must be an nn.Module following the experts protocol, got {type(experts).__name__}")
    missing = [name for name in EXPERTS_PROTOCOL if not hasattr(experts, name)]
    if type(experts).forward is nn.Module.forward:  # nn.Module's own forward only raises
        missing.append("forward")
    if missing:
        raise TypeError(f"experts ({type(experts).__name__}) must follow the experts protocol: it lacks "
                        f"{', '.join(missing)} (needs attributes num_experts, dim, out_dim and "
                        "forward(tokens [T, dim], routing) -> [T, out_dim])")
    for name in EXPERTS_PROTOCOL:
        value = getattr(experts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"experts.{name} must be a positive int, got {value!r}")


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    # nn.Linear's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


def _local_shard(param: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a DTensor parameter (differentiable: its gradient becomes the DTensor's), else ``param``."""
    return param.to_local() if hasattr(param, "to_local") else param


class ExpertMLPs(nn.Module):
    """E expert MLPs in the ``moe_mlp`` layout (see the module docstring), initialised as
    ``nn.Linear`` layers are; follows the experts protocol: ``forward(tokens [T, dim], routing) -> [T, out_dim]``.

    Args:
        num_experts: E; dim: input width D; hidden_dim: H; out_dim: output width.
        activation: "gelu" (exact), "gelu_tanh", "silu", "swiglu" (w1 holds [gate | up], 2H columns) or "relu".
        bias: biases b1, b2.
        backend: kernel backend ("triton", "torch" or None for the backend rule).
        recompute_hidden: ``moe_mlp``'s trade on the Triton grouped path: True (memory-lean) recomputes
            the pre-activation in backward, False keeps it (k * H (2H gated) values per token more
            kept, one GEMM fewer). An attribute, which may be changed between calls.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, out_dim: int, *, activation: str = "gelu",
                 bias: bool = True, backend: str | None = None, recompute_hidden: bool = True):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim),
                            ("out_dim", out_dim)):
            check_positive_int(name, value)
        check_activation(activation)
        self.num_experts, self.dim, self.hidden_dim, self.out_dim = num_experts, dim, hidden_dim, out_dim
        self.activation, self.backend = activation, check_backend(backend)
        self.recompute_hidden = recompute_hidden
        first = first_layer_width(activation, hidden_dim)
        self.w1 = nn.Parameter(_uniform_(torch.empty(num_experts, dim, first), dim))
        self.w2 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden_dim, out_dim), hidden_dim))
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, first), dim)) if bias else None
        self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, out_dim), hidden_dim)) if bias else None

    def forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """sum_j w[t, j] * Expert_{e[t, j]}(tokens[t]) for the routing's weights w and experts e.

        Weights sharded over ranks (DTensors: ``moe_restore.parallel.ExpertParallel``) are used
        through their local shard, the experts this rank holds, which the routing then addresses."""
        w1, w2, b1, b2 = (_local_shard(p) for p in (self.w1, self.w2, self.b1, self.b2))
        return moe_mlp(tokens, routing, w1, w2, b1, b2, activation=self.activation, backend=self.backend,
                       recompute_hidden=self.recompute_hidden)

    @torch.no_grad()
    def copy_dense_(self, linear1: nn.Linear, linear2: nn.Linear, noise_std: float = 0.0) -> None:
        """Make every expert a copy of the dense MLP linear2(act(linear1(u))), plus independent
        N(0, noise_std^2) noise on each copy's w1 and w2 (to break the experts' symmetry)."""
        check_finite_non_negative("noise_std", noise_std)
        self.w1.copy_(linear1.weight.t().expand_as(self.w1))
        self.w2.copy_(linear2.weight.t().expand_as(self.w2))
        if noise_std:
            for w in (self.w1, self.w2):
                w.add_(torch.randn_like(w), alpha=noise_std)
        for bias, source in ((self.b1, linear1.bias), (self.b2, linear2.bias)):
            if bias is not None:
                bias.copy_(source.expand_as(bias) if source is not None else torch.zeros_like(bias))

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero w2 and b2: every expert outputs 0 (and still receives gradients through w2)."""
        for p in (self.w2, self.b2):
            if p is not None:
                p.zero_()


class DenseMLP(nn.Module):
    """One MLP every token goes through: act(u @ w1 + b1) @ w2 + b2 in torch ops (see the module
    docstring), initialised as ``nn.Linear`` layers are. The shared expert of the MoE layers.

    Args:
        dim: input width D; hidden_dim: H (S shared experts of width H: S*H); out_dim: output width.
        activation: as ``ExpertMLPs`` (a gated one: w1 holds [gate | up], 2H columns).
        bias: biases b1, b2.

    Parameters: ``w1`` [D, H or 2H], ``b1`` [H or 2H], ``w2`` [H, out_dim], ``b2`` [out_dim] (None without bias).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, *, activation: str = "gelu", bias: bool = True):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            check_positive_int(name, value)
        self.dim, self.hidden_dim, self.out_dim = dim, hidden_dim, out_dim
        self.activation = check_activation(activation)
        first = first_layer_width(activation, hidden_dim)
        self.w1 = nn.Parameter(_uniform_(torch.empty(dim, first), dim))
        self.w2 = nn.Parameter(_uniform_(torch.empty(hidden_dim, out_dim), hidden_dim))
        self.b1 = nn.Parameter(_uniform_(torch.empty(first), dim)) if bias else None
        self.b2 = nn.Parameter(_uniform_(torch.empty(out_dim), hidden_dim)) if bias else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """act(tokens @ w1 + b1) @ w2 + b2, [T, out_dim] for tokens [T, dim]."""
        z = tokens @ self.w1
        if self.b1 is not None:
            z = z + self.b1
        y = activate(z, self.activation) @ self.w2
        return y + self.b2 if self.b2 is not None else y

    @torch.no_grad()
    def copy_dense_(self, linear1: nn.Linear, linear2: nn.Linear) -> None:
        """Become the dense MLP linear2(act(linear1(u))) (zero biases where a Linear has none)."""
        self.w1.copy_(linear1.weight.t())
        self.w2.copy_(linear2.weight.t())
        for bias, source in ((self.b1, linear1.bias), (self.b2, linear2.bias)):
            if bias is not None:
                bias.copy_(source if source is not None else torch.zeros_like(bias))

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero w2 and b2: the MLP outputs 0 (and still receives gradients through w2)."""
        for p in (self.w2, self.b2):
            if p is not None:
                p.zero_()


def shared_banks_to_dense(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every shared expert written as a bank of S experts (``shared_expert.w1``
    [S, D, F], ``b1`` [S, F], ``w2`` [S, H, out], ``b2`` [S, out], the layout before ``DenseMLP``)
    rewritten into the layout of the ``DenseMLP`` of width S*H that ``model`` holds at that name.

    The columns of the S experts are laid side by side (module docstring): w1 -> [D, S*F], w2 ->
    [S*H, out], b2 -> sum over s. A concatenated gated activation takes the S gate blocks first,
    then the S up blocks; an interleaved one keeps its (gate, up) column pairs. Other keys and
    state dicts already in the DenseMLP layout pass through unchanged; the input is not modified.
    """
    converted = dict(state_dict)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        w1 = state_dict.get(prefix + "w1")
        if not isinstance(module, DenseMLP) or w1 is None or w1.dim() != 3:
            continue
        spec = activation_spec(module.activation)
        blocks = 2 if spec.gated and not spec.interleaved else 1
        converted[prefix + "w1"] = _side_by_side(w1, blocks)
        converted[prefix + "w2"] = state_dict[prefix + "w2"].reshape(-1, state_dict[prefix + "w2"].shape[-1])
        if prefix + "b1" in state_dict:
            converted[prefix + "b1"] = _side_by_side(state_dict[prefix + "b1"], blocks)
        if prefix + "b2" in state_dict:
            converted[prefix + "b2"] = state_dict[prefix + "b2"].sum(dim=0)
    return converted


def _side_by_side(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """[S, ..., F] -> [..., S*F]: each of the ``blocks`` column blocks of F (gate, up) of the S
    experts side by side, expert s's part of a block at s*(F/blocks) .. (s+1)*(F/blocks)."""
    return torch.cat([part.movedim(0, -2).reshape(*part.shape[1:-1], -1) for part in t.chunk(blocks, dim=-1)],
                     dim=-1)

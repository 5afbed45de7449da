"""MoE: a router, a bank of routed experts and an optional shared expert, composed.

For tokens x [..., dim] (and an optional per-image context c [B, P] that the router reads):

    (routing, losses) = router(x[t], c)
    y[t] = sum_j w[t, j] * Expert_{e[t, j]}(x[t]) + Shared(x[t])

``forward`` returns y. ``run`` returns y together with an ``MoERecord`` (the routing and the
router's ``RouterLosses``) and keeps nothing; ``forward`` keeps the record of its call as
``last_record`` (read by ``aux_loss``, ``router_z_loss``, ``group_probs`` and ``last_routing``),
because networks that call the layer deep inside a model (diffusers blocks, M2IR's decoder)
collect the losses after their forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from moe_restore.kernels import Routing
from moe_restore.kernels.validation import check_float

from .experts import ExpertMLPs
from .routers import RouterLosses


@dataclass(frozen=True)
class MoERecord:
    """One MoE call: its ``routing`` and the router's ``losses``; ``group_probs`` (nested routers)
    in the layout of the input, [..., G]."""

    routing: Routing
    losses: RouterLosses
    group_probs: torch.Tensor | None = None


class MoE(nn.Module):
    """``MoE(router, experts, shared_expert=None)``: see the module docstring.

    Args:
        router: ``router(tokens [T, dim], context) -> (Routing, RouterLosses)`` over
            ``experts.num_experts`` experts (``TopKRouter``, ``NestedRouter``).
        experts: an ``ExpertMLPs`` bank [E, dim -> out_dim], applied by the routing.
        shared_expert: a module [T, dim] -> [T, out_dim] every token uses with weight 1 (e.g. an
            ``ExpertMLPs`` of shared experts, which then all run), or None.
    """

    def __init__(self, router: nn.Module, experts: ExpertMLPs, shared_expert: nn.Module | None = None):
        super().__init__()
        if not isinstance(experts, ExpertMLPs):
            raise TypeError(f"experts must be an ExpertMLPs, got {type(experts).__name__}")
        if getattr(router, "num_experts", experts.num_experts) != experts.num_experts:
            raise ValueError(f"the router routes to {router.num_experts} experts, the bank holds {experts.num_experts}")
        self.router, self.experts, self.shared_expert = router, experts, shared_expert
        self.last_record: MoERecord | None = None

    @property
    def dim(self) -> int:
        return self.experts.dim

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    @property
    def backend(self) -> str | None:
        """The kernel backend of the router and the experts ("triton", "torch", None: the rule)."""
        return self.experts.backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        for part in (self.router, self.experts, self.shared_expert):
            if part is not None and hasattr(part, "backend"):
                part.backend = backend

    def run(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, MoERecord]:
        """(y [..., out_dim], the call's MoERecord) for x [..., dim]; keeps nothing."""
        check_float("x", x)
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., dim={self.dim}], got {tuple(x.shape)}")
        tokens = x.reshape(-1, self.dim)
        routing, losses = self.router(tokens, context)
        y = self.experts(tokens, routing)
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        probs = losses.group_probs
        record = MoERecord(routing, losses, None if probs is None else probs.view(*x.shape[:-1], probs.shape[-1]))
        return y.view(*x.shape[:-1], self.out_dim), record

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """y [..., out_dim] for x [..., dim]; its record becomes ``last_record``."""
        y, self.last_record = self.run(x, context)
        return y

    def _record(self) -> MoERecord:
        if self.last_record is None:
            raise RuntimeError("the MoE losses and routing are defined after a forward pass")
        return self.last_record

    @property
    def aux_loss(self) -> torch.Tensor:
        """The router's load-balancing loss of the last forward (float32 scalar)."""
        return self._record().losses.aux_loss

    @property
    def router_z_loss(self) -> torch.Tensor | None:
        """The router z-loss of the last forward (top-k routers; None otherwise)."""
        return self._record().losses.router_z_loss

    @property
    def group_probs(self) -> torch.Tensor | None:
        """softmax of the group logits of the last forward, [..., G] (nested routers; None otherwise)."""
        return self._record().group_probs

    @property
    def last_routing(self) -> Routing:
        """The Routing of the last forward."""
        return self._record().routing


def pixel_tokens(x: torch.Tensor) -> torch.Tensor:
    """The pixels of a feature map x [B, C, H, W] as tokens, the view [B, H, W, C]."""
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    return x.movedim(1, -1)


def per_pixel(forward: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """Apply a token layer's ``forward`` to every pixel of x [B, C, H, W] -> [B, C_out, H, W]."""
    return forward(pixel_tokens(x), *args).movedim(-1, 1)


def rename_legacy_keys(module: nn.Module, renames: dict[str, str]) -> None:
    """Let ``module.load_state_dict`` read state dicts written before the layer was a composition:
    a key ``prefix + old + rest`` becomes ``prefix + new + rest`` for each (old, new) of ``renames``
    (old a parameter name, or a child's name ending in '.'). The hook pickles with the module."""
    module.register_load_state_dict_pre_hook(partial(_rename_keys, dict(renames)))


def _rename_keys(renames: dict[str, str], _module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        for old, new in renames.items():
            if local == old or (old.endswith(".") and local.startswith(old)):
                state_dict[prefix + new + local[len(old):]] = state_dict.pop(key)
                break

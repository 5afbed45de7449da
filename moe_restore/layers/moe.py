"""MoE: a router, routed experts and an optional shared expert, composed (torchtune's way).

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

import torch
import torch.nn as nn

from moe_restore.kernels import Routing
from moe_restore.kernels.validation import check_float

from .experts import check_experts
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
            ``experts.num_experts`` experts (``TopKRouter``, ``NestedRouter`` or your own).
        experts: any module following the experts protocol (``moe_restore.layers.experts``:
            ``num_experts``, ``dim``, ``out_dim`` and ``forward(tokens, routing) -> [T, out_dim]``),
            e.g. an ``ExpertMLPs`` bank.
        shared_expert: a module [T, dim] -> [T, out_dim] every token uses with weight 1 (e.g. a
            ``DenseMLP``), or None.

    There is no ``combine`` argument: the experts module combines its outputs itself (the weighted
    sum in ``moe_mlp``'s epilogue), because that is where the combine is cheap; see docs/layers.md.
    """

    def __init__(self, router: nn.Module, experts: nn.Module, shared_expert: nn.Module | None = None):
        super().__init__()
        check_experts(experts)
        if not callable(router):
            raise TypeError(f"router must be callable as router(tokens, context), got {type(router).__name__}")
        if getattr(router, "num_experts", experts.num_experts) != experts.num_experts:
            raise ValueError(f"the router routes to {router.num_experts} experts, the experts module holds "
                             f"{experts.num_experts}")
        if shared_expert is not None and not callable(shared_expert):
            raise TypeError(f"shared_expert must be a module [T, dim] -> [T, out_dim] or None, "
                            f"got {type(shared_expert).__name__}")
        for name in ("dim", "out_dim"):
            if getattr(shared_expert, name, getattr(experts, name)) != getattr(experts, name):
                raise ValueError(f"shared_expert.{name} = {getattr(shared_expert, name)} but experts.{name} = "
                                 f"{getattr(experts, name)}")
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
        return getattr(self.experts, "backend", getattr(self.router, "backend", None))

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

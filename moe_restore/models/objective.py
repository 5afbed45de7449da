"""The objective protocol: how a network tells the trainer what to optimise.

Every network of ``moe_restore.models`` declares

    training_loss(degraded, clean, labels, weights, *, generator=None) -> (total loss, {term: float})

on a batch of degraded/clean images [B, 3, H, W] in [0, 1] with degradation labels [B] (-1:
unknown), weighted by ``LossWeights``; every random draw of the objective comes from
``generator`` (a ``torch.Generator`` the trainer owns and checkpoints; None: the global RNG). M2IR restores directly and is scored by
``restoration_loss``; MiM-DiT returns its rectified-flow loss. The trainer calls only this method.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from moe_restore.losses import LossWeights


@runtime_checkable
class TrainableRestorer(Protocol):
    """A network that declares its training objective (see the module docstring)."""

    def training_loss(self, degraded: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor | None,
                      weights: LossWeights, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]: ...

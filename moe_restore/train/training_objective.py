"""What the trainer optimises: the protocol a network follows to declare its objective, and the
module that calls it.

Every network of ``moe_restore.models`` declares

    training_loss(degraded, clean, labels, weights, *, generator=None) -> (total loss, {term: float})

on a batch of degraded/clean images [B, 3, H, W] in [0, 1] with degradation labels [B] (-1:
unknown), weighted by ``LossWeights``; every random draw of the objective comes from
``generator`` (a ``torch.Generator`` the trainer owns and saves in every checkpoint, so that a
resumed run is bit-exact; None: the global RNG). M2IR restores directly and is scored by
``restoration_loss``; MiM-DiT returns its rectified-flow loss. The trainer calls only this method,
through ``TrainingObjective``: one module whose forward returns the loss, so that
DistributedDataParallel, which synchronises gradients from its forward, can wrap it. The networks
follow the protocol structurally and import nothing from here.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from moe_restore.losses import LossWeights


@runtime_checkable
class TrainableRestorer(Protocol):
    """A network that declares its training objective (see the module docstring)."""

    def training_loss(self, degraded: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor | None,
                      weights: LossWeights, *, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]: ...


class TrainingObjective(nn.Module):
    """forward(degraded, clean, labels) -> (total loss, its terms as floats)."""

    def __init__(self, model: nn.Module, weights: LossWeights, *, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(model, TrainableRestorer):
            raise TypeError(f"{type(model).__name__} declares no training_loss(degraded, clean, labels, weights) "
                            "(see moe_restore.train.training_objective)")
        self.model, self.weights, self.generator = model, weights, generator

    def forward(self, degraded: torch.Tensor, clean: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_loss(degraded, clean, labels, self.weights, generator=self.generator)

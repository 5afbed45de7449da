"""What the trainer optimises, as one module whose forward returns the loss (so that
DistributedDataParallel, which synchronises gradients from its forward, can wrap it).

The network declares its objective through the protocol of ``moe_restore.models.objective``:
``training_loss(degraded, clean, labels, weights, *, generator) -> (total, terms)`` (M2IR:
``restoration_loss`` of its output; MiM-DiT: rectified flow, whose random draws come from the
objective's ``generator``, saved in every checkpoint so that a resumed run is bit-exact).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_restore.losses import LossWeights
from moe_restore.models.objective import TrainableRestorer


class TrainingObjective(nn.Module):
    """forward(degraded, clean, labels) -> (total loss, its terms as floats)."""

    def __init__(self, model: nn.Module, weights: LossWeights, *, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(model, TrainableRestorer):
            raise TypeError(f"{type(model).__name__} declares no training_loss(degraded, clean, labels, weights) "
                            "(see moe_restore.models.objective)")
        self.model, self.weights, self.generator = model, weights, generator

    def forward(self, degraded: torch.Tensor, clean: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_loss(degraded, clean, labels, self.weights, generator=self.generator)

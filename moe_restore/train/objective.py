"""What the trainer optimises, as one module whose forward returns the loss (so that
DistributedDataParallel, which synchronises gradients from its forward, can wrap it).

A network either defines its own objective, ``training_loss(degraded, clean, labels, weights) ->
(total, terms)`` (MiM-DiT: rectified flow), which also receives the objective's ``generator``
for its random draws (``generator=``), or is a direct restorer ``restored = net(degraded)``
exposing ``aux_loss`` and ``class_logits`` after each forward (M2IR), trained with
``restoration_loss``; it receives the degradation labels (``net(degraded, labels=labels)``), which
M2IR's per-degradation output heads use in training.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_restore.train.losses import LossWeights, restoration_loss


class TrainingObjective(nn.Module):
    """forward(degraded, clean, labels) -> (total loss, its terms as floats)."""

    def __init__(self, model: nn.Module, weights: LossWeights, *, generator: torch.Generator | None = None):
        super().__init__()
        self.model, self.weights, self.generator = model, weights, generator

    def forward(self, degraded: torch.Tensor, clean: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if hasattr(self.model, "training_loss"):
            return self.model.training_loss(degraded, clean, labels, self.weights, generator=self.generator)
        restored = self.model(degraded, labels=labels)
        return restoration_loss(restored.float(), clean, weights=self.weights, aux_loss=self.model.aux_loss,
                                class_logits=self.model.class_logits, labels=labels, inputs=degraded)

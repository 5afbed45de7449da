"""DegradationEncoder: the degradation-aware context prior, trained jointly with the restorer.

M2IR's paper drives its router with DA-CLIP degradation embeddings (512-d, from a ViT-B/32 CLIP
whose weights come from a hub). This small CNN stands in for it:

    f = GAP(CNN(x))                 four stride-2 conv3x3 + GELU stages
    embedding = W_e f  [B, P]       the context the ADEC routers read
    class_logits = W_c embedding    degradation-type classifier (cross-entropy in the loss)

The classifier makes the embedding degradation-discriminative, as DA-CLIP's contrastive training
does. A user with DA-CLIP passes its [B, 512] features to M2IR instead (``context=``), built with
``context_dim=512``; the encoder is then not called.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DegradationEncoder(nn.Module):
    """Image [B, 3, H, W] -> (embedding [B, P], class logits [B, num_classes])."""

    def __init__(self, embed_dim: int, num_classes: int, *, width: int = 32, in_channels: int = 3):
        super().__init__()
        widths = [width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for w in widths:
            layers += [nn.Conv2d(previous, w, 3, stride=2, padding=1), nn.GELU()]
            previous = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(previous, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(self.features(image))
        return embedding, self.classifier(embedding)

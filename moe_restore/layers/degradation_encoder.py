"""DegradationEncoder: the degradation-aware context prior, trained jointly with the restorer.

M2IR's paper drives its router with DA-CLIP degradation embeddings (512-d, from a ViT-B/32 CLIP
whose weights come from a hub). This small CNN stands in for it:

    f = GAP(CNN(x))                 four stride-2 conv3x3 + GELU stages
    s = image_statistics(x)         per channel: log high-pass energy at two scales, mean, log variance,
                                    log kurtosis of the high-pass, log horizontal and vertical
                                    gradient energy
    embedding = W_e [f ; s]  [B, P] the context the ADEC routers read
    class_logits = W_c embedding    degradation-type classifier (cross-entropy in the loss)

The statistics are what tells the degradations apart, on a log scale so that they do not depend
on the image's contrast: noise and rain raise the high-frequency energy, blur lowers it, low light
lowers the mean and the variance, haze raises the mean and lowers the variance. Noise and rain
differ in the shape of the high-pass distribution (Gaussian noise: kurtosis near 3; sparse rain
streaks: heavy tails) and in direction (streaks fall near vertically: the horizontal gradient
energy exceeds the vertical one). The CNN's pooled features are linear in the energies, so it
learns these distinctions slowly on its own; the statistics give them directly (the measurements
are in docs/m2ir.md).

The classifier makes the embedding degradation-discriminative, as DA-CLIP's contrastive training
does. A user with DA-CLIP passes its [B, 512] features to M2IR instead (``context=``), built with
``context_dim=512``; the encoder is then not called.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6
STATISTICS_PER_CHANNEL = 7


def _high_pass(image: torch.Tensor) -> torch.Tensor:
    """x - box3x3(x), edges replicated."""
    return image - F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _log_mean_square(values: torch.Tensor) -> torch.Tensor:
    """log mean x^2 per channel: [B, C, H, W] -> [B, C]."""
    return values.pow(2).mean((2, 3)).add(_EPS).log()


def image_statistics(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (any H, W >= 1) -> [B, 7 C]: per channel the log high-pass energy at full and
    at half resolution, the mean, the log variance, the log kurtosis of the high-pass
    (log m4 - 2 log m2), and the log energy of the horizontal and of the vertical differences
    (edges replicated, so a one-pixel side gives differences of zero)."""
    h, w = image.shape[2:]
    half = F.adaptive_avg_pool2d(image, (max(1, h // 2), max(1, w // 2)))
    variance = image.var(dim=(2, 3), correction=0)
    high = _high_pass(image)
    log_m2 = _log_mean_square(high)
    log_m4 = high.pow(4).mean((2, 3)).add(_EPS**2).log()  # eps^2: m4 / m2^2 stays scale-free
    across = F.pad(image, (0, 1, 0, 0), mode="replicate").diff(dim=3)
    down = F.pad(image, (0, 0, 0, 1), mode="replicate").diff(dim=2)
    return torch.cat([log_m2, _log_mean_square(_high_pass(half)), image.mean((2, 3)), variance.add(_EPS).log(),
                      log_m4 - 2 * log_m2, _log_mean_square(across), _log_mean_square(down)], dim=1)


class DegradationEncoder(nn.Module):
    """Image [B, C, H, W] -> (embedding [B, P], class logits [B, num_classes])."""

    def __init__(self, embed_dim: int, num_classes: int, *, width: int = 32, in_channels: int = 3):
        super().__init__()
        widths = [width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for w in widths:
            layers += [nn.Conv2d(previous, w, 3, stride=2, padding=1), nn.GELU()]
            previous = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(previous + STATISTICS_PER_CHANNEL * in_channels, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(torch.cat([self.features(image), image_statistics(image.float()).to(image.dtype)], 1))
        return embedding, self.classifier(embedding)

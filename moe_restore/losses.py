"""Training losses of the restoration networks.

total = Charbonnier(out, gt)
      + lambda_fft * (mean |A(out) - A(gt)| + mean |wrap(phi(out) - phi(gt))|)
      + lambda_lb  * load-balancing loss of the MoE layers
      + lambda_cls * cross-entropy of the degradation classifier

Charbonnier(x, y) = mean sqrt((x - y)^2 + eps^2), eps = 1e-3.

With ``relative = p > 0`` every image's pixel terms are computed on out / s^p and gt / s^p,
s = mean |input - gt| of that image (at least 1e-3): each image's loss is measured relative to how
degraded its input was, so that mild degradations (light noise, slight blur) are not drowned by
severe ones (haze, low light) in a mixed batch. p = 1 weighs all images alike, which in turn
starves the severe ones (the input errors of the built-in set span 0.007-0.5); the demo's
m2ir-tiny run uses p = 0.75 (docs/m2ir.md). A and phi are the amplitude and
phase of the orthonormal 2-D real FFT of each channel; the phase difference is wrapped to
(-pi, pi] (the angle of F(out) conj(F(gt))), so that a phase of pi and -pi count as equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (the Charbonnier term has weight 1)."""

    fft: float = 0.1
    load_balance: float = 0.01
    classification: float = 0.1
    relative: float = 0.0  # the exponent p above; 0: plain loss

    def __post_init__(self):
        if not 0.0 <= float(self.relative) <= 1.0:
            raise ValueError(f"relative must be an exponent in [0, 1], got {self.relative}")


def charbonnier(output: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean sqrt((output - target)^2 + eps^2)."""
    return torch.sqrt((output - target).pow(2) + eps * eps).mean()


def fft_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 of the FFT amplitude difference plus L1 of the wrapped FFT phase difference."""
    f_out = torch.fft.rfft2(output.float(), norm="ortho")
    f_gt = torch.fft.rfft2(target.float(), norm="ortho")
    amplitude = (f_out.abs() - f_gt.abs()).abs().mean()
    cross = f_out * f_gt.conj()
    # angle() has an undefined gradient where a coefficient is exactly zero: give those a phase
    # difference of 0 through a safe argument instead of letting NaN reach the weights.
    zero = cross.abs() < 1e-12
    safe = torch.where(zero, torch.ones_like(cross), cross)
    phase = torch.where(zero, torch.zeros_like(safe.real), safe.angle()).abs().mean()
    return amplitude + phase


def restoration_loss(output: torch.Tensor, target: torch.Tensor, *, weights: LossWeights,
                     aux_loss: torch.Tensor | None = None, class_logits: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None,
                     inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and its terms (as floats, for logging). ``inputs`` (the degraded images) are
    needed with ``weights.relative``."""
    if weights.relative:
        if inputs is None:
            raise ValueError("weights.relative needs the degraded inputs")
        error = (inputs - target).abs().flatten(1).mean(1).clamp_min(1e-3).to(output)
        scale = error.pow(float(weights.relative))[:, None, None, None]
        output, target = output / scale, target / scale
    terms = {"charbonnier": charbonnier(output, target)}
    if weights.fft:
        terms["fft"] = weights.fft * fft_loss(output, target)
    if weights.load_balance and aux_loss is not None:
        terms["load_balance"] = weights.load_balance * aux_loss
    if weights.classification and class_logits is not None:
        if labels is None:
            raise ValueError("labels are required when class_logits are given")
        terms["classification"] = weights.classification * F.cross_entropy(class_logits.float(), labels)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}

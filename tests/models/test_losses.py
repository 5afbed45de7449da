"""Charbonnier, FFT amplitude/phase and the combined loss against plain float64 formulas."""
from __future__ import annotations

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from moe_restore.losses import LossWeights, charbonnier, fft_loss, restoration_loss


def test_charbonnier_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64), torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    expected = sum(math.sqrt((a - b) ** 2 + 1e-6) for a, b in zip(x.flatten().tolist(), y.flatten().tolist())) / x.numel()
    assert abs(float(charbonnier(x, y)) - expected) < 1e-12
    assert abs(float(charbonnier(y, y)) - 1e-3) < 1e-12


def _dft_terms(x: torch.Tensor, y: torch.Tensor) -> float:
    """Amplitude and wrapped phase L1 of the orthonormal real 2-D DFT, by the definition."""
    h, w = x.shape
    amp = phase = 0.0
    count = 0
    for u in range(h):
        for v in range(w // 2 + 1):
            fx = sum(x[i, j] * cmath.exp(-2j * math.pi * (u * i / h + v * j / w)) for i in range(h) for j in range(w))
            fy = sum(y[i, j] * cmath.exp(-2j * math.pi * (u * i / h + v * j / w)) for i in range(h) for j in range(w))
            fx, fy = fx / math.sqrt(h * w), fy / math.sqrt(h * w)
            amp += abs(abs(fx) - abs(fy))
            phase += abs(cmath.phase(fx * fy.conjugate()))
            count += 1
    return amp / count + phase / count


def test_fft_loss_matches_the_dft_definition():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64), torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64)
    expected = _dft_terms(x[0, 0].numpy(), y[0, 0].numpy())
    assert abs(float(fft_loss(x, y)) - expected) < 1e-5  # fft_loss computes in float32
    assert float(fft_loss(y, y)) < 1e-6


def test_fft_loss_gradient_is_finite_at_zero_coefficients():
    x = torch.zeros(1, 3, 8, 8, requires_grad=True)
    y = torch.zeros(1, 3, 8, 8)
    fft_loss(x, y).backward()
    assert torch.isfinite(x.grad).all()


def test_restoration_loss_combines_weighted_terms():
    g = torch.Generator().manual_seed(2)
    out, gt = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    aux = torch.tensor(1.25)
    logits, labels = torch.randn(2, 5, generator=g), torch.tensor([0, 3])
    weights = LossWeights(fft=0.2, load_balance=0.01, classification=0.5)
    total, terms = restoration_loss(out, gt, weights=weights, aux_loss=aux, class_logits=logits, labels=labels)
    expected = (charbonnier(out, gt) + 0.2 * fft_loss(out, gt) + 0.01 * aux
                + 0.5 * F.cross_entropy(logits, labels))
    assert abs(float(total - expected)) < 1e-6
    assert set(terms) == {"charbonnier", "fft", "load_balance", "classification"}
    only_pixels, terms = restoration_loss(out, gt, weights=LossWeights(0, 0, 0), aux_loss=aux)
    assert set(terms) == {"charbonnier"} and float(only_pixels) == float(charbonnier(out, gt))


def test_relative_loss_measures_each_image_against_its_input_error():
    g = torch.Generator().manual_seed(3)
    gt = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64)
    inputs = gt + torch.tensor([0.02, 0.4], dtype=torch.float64)[:, None, None, None]  # a mild and a severe input
    out = gt + 0.5 * (inputs - gt)  # both halve their input's error
    weights = LossWeights(fft=0.0, load_balance=0.0, classification=0.0, relative=True)
    total, _ = restoration_loss(out, gt, weights=weights, inputs=inputs)
    per_image = [sum(math.sqrt((0.5 * e / e) ** 2 + 1e-6) for _ in range(3 * 6 * 6)) / (3 * 6 * 6) for e in (0.02, 0.4)]
    assert abs(float(total) - sum(per_image) / 2) < 1e-9
    with pytest.raises(ValueError, match="inputs"):
        restoration_loss(out, gt, weights=weights)


def test_relative_exponent_interpolates_between_plain_and_relative():
    """relative = p divides each image by s^p: at p = 0.5 an image whose input error is 4 times
    another's, with outputs at the same fraction of it, weighs sqrt(4) = 2 times more, not 4 (plain)
    or 1 (p = 1)."""
    gt = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    errors = torch.tensor([0.05, 0.2], dtype=torch.float64)[:, None, None, None]
    inputs, out = gt + errors, gt + 0.5 * errors
    for p, expected_ratio in ((0.0, 4.0), (0.5, 2.0), (1.0, 1.0)):
        weights = LossWeights(fft=0.0, load_balance=0.0, classification=0.0, relative=p)
        per_image = [float(restoration_loss(out[i:i + 1], gt[i:i + 1], weights=weights, inputs=inputs[i:i + 1])[0])
                     for i in range(2)]
        assert abs(per_image[1] / per_image[0] - expected_ratio) < 1e-3 * expected_ratio
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="relative"):
            LossWeights(relative=bad)

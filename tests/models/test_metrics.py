"""PSNR / SSIM (RGB and Y) against scikit-image's values, and the identity's scores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from moe_restore.train.metrics import image_metrics, psnr, rgb_to_y, ssim


def _pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    output = (target + 0.08 * torch.randn(3, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return output, target


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float, **channel) -> float:
    return structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, **channel)


@pytest.mark.parametrize("h, w, seed", [(11, 11, 0), (37, 29, 1), (64, 80, 2)])
def test_rgb_metrics_match_skimage(h, w, seed):
    output, target = _pair(h, w, seed)
    expected_psnr = peak_signal_noise_ratio(_numpy(target), _numpy(output), data_range=1)
    expected_ssim = _skimage_ssim(_numpy(target), _numpy(output), 1, channel_axis=-1)
    assert abs(float(psnr(output, target)) - expected_psnr) < 1e-9
    assert abs(float(ssim(output, target)) - expected_ssim) < 1e-9


@pytest.mark.parametrize("h, w, seed", [(23, 31, 3), (48, 40, 4)])
def test_y_channel_metrics_match_skimage(h, w, seed):
    output, target = _pair(h, w, seed)
    y_out, y_target = rgb2ycbcr(_numpy(output))[..., 0], rgb2ycbcr(_numpy(target))[..., 0]
    assert abs(float(psnr(output, target, y_channel=True))
               - peak_signal_noise_ratio(y_target, y_out, data_range=255)) < 1e-9
    assert abs(float(ssim(output, target, y_channel=True)) - _skimage_ssim(y_target, y_out, 255)) < 1e-9
    assert torch.allclose(rgb_to_y(target[None])[0, 0], torch.from_numpy(y_target) / 255, atol=1e-12)


def test_batched_metrics_and_identity():
    output, target = _pair(20, 24, 5)
    batch_out, batch_target = torch.stack([output, target]), torch.stack([target, target])
    values = psnr(batch_out, batch_target)
    assert values.shape == (2,) and abs(float(values[0] - psnr(output, target))) < 1e-12
    assert float(ssim(target, target)) == pytest.approx(1.0, abs=1e-12)
    assert image_metrics(target, target)["psnr"] == math.inf
    with pytest.raises(ValueError, match="output"):
        psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 9))
    with pytest.raises(ValueError, match="SSIM"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))

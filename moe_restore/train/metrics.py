"""PSNR and SSIM on RGB and on the luma (Y) channel, images in [0, 1].

Conventions (those of the restoration literature, and scikit-image's values for them):

* PSNR = 10 log10(1 / MSE) with data range 1, over all pixels and channels.
* SSIM: Wang et al. 2004 with an 11 x 11 Gaussian window (sigma 1.5, truncated at 3.5 sigma),
  K1 = 0.01, K2 = 0.03, population covariances, averaged over the window positions that lie
  fully inside the image and then over channels. This equals
  ``skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1)``: scikit-image crops (win - 1) / 2 pixels from
  each border before averaging, which leaves exactly the fully-inside positions.
* Y: ITU-R BT.601 luma as in ``skimage.color.rgb2ycbcr``, Y = (16 + 65.481 R + 128.553 G +
  24.966 B) / 255 for R, G, B in [0, 1].

All arithmetic is float64. Inputs are [3, H, W] or [B, 3, H, W]; batched inputs give one value
per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # scipy's gaussian_filter truncation, as skimage uses
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _batched(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape [3, H, W] or [B, 3, H, W], got {tuple(t.shape)}")
    return t.detach().double()


def _pair(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output, target = _batched("output", output), _batched("target", target)
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} must have one shape")
    return output, target.to(output.device)


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [16/255, 235/255] of [B, 3, H, W] RGB in [0, 1] -> [B, 1, H, W]."""
    weights = image.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (16.0 + (image * weights).sum(1, keepdim=True)) / 255.0


def _psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mse = (output - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)  # identical images: inf, as scikit-image


def _ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    size = 2 * _SSIM_RADIUS + 1
    if min(output.shape[2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size}, got {tuple(output.shape[2:])}")
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=output.device)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    channels = output.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        t = F.conv2d(t, g.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
        return F.conv2d(t, g.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(output), blur(target)
    var_x = blur(output * output) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(output * target) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(1)


def _score(measure, output: torch.Tensor, target: torch.Tensor, y_channel: bool) -> torch.Tensor:
    single = output.dim() == 3
    output, target = _pair(output, target)
    if y_channel:
        output, target = rgb_to_y(output), rgb_to_y(target)
    value = measure(output, target)
    return value[0] if single else value


def psnr(output: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False) -> torch.Tensor:
    """PSNR in dB (data range 1) per image: shape [B] (or [] for a single [3, H, W] image)."""
    return _score(_psnr, output, target, y_channel)


def ssim(output: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False) -> torch.Tensor:
    """SSIM per image (see the module docstring for the exact definition)."""
    return _score(_ssim, output, target, y_channel)


def image_metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM, RGB and Y, of one [3, H, W] image pair, as floats."""
    output = output.clamp(0, 1)
    values = {
        "psnr": psnr(output, target), "ssim": ssim(output, target),
        "psnr_y": psnr(output, target, y_channel=True), "ssim_y": ssim(output, target, y_channel=True),
    }
    return {k: float(v) for k, v in values.items()}

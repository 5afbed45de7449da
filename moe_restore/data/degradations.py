"""Degradation synthesis: each degradation is a pure function of (clean image, seed, strength).

Images are float32 tensors [3, H, W] with values in [0, 1]; every function returns a new tensor of
the same shape, clipped to [0, 1], and draws all its randomness from ``torch.Generator`` seeded
with ``seed`` (same inputs, same output, on any machine). ``strength`` in [0, 1] maps to the
documented physical range of each degradation:

==========  ===================================================================================
noise       additive Gaussian noise, sigma = 15 + 35 * strength (on the 0-255 scale):
            strength 0, 2/7, 1 give the benchmark levels sigma 15, 25, 50 (``NOISE_STRENGTH``)
rain        streaks: sparse seeds smeared along one direction (angle +-30 deg from vertical),
            length 7-21 px, seed density 0.5-2 % of pixels, brightness 0.6-1.0 (screen blend)
haze        atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), d a smooth depth proxy
            in [0, 1] (far at the top), beta = 0.4 + 1.6 * strength, airlight A in [0.75, 0.95]
blur        motion-trajectory kernel (random walk, 9-23 px support) or Gaussian kernel
            (sigma = 0.8 + 2.2 * strength), chosen by the seed; kernels sum to 1
lowlight    I = s * J^gamma, gamma = 1.5 + 1.5 * strength, s = 0.7 - 0.4 * strength, then
            Poisson-Gaussian sensor noise (peak 200 - 150 * strength photons, read noise 0.01)
==========  ===================================================================================

Composites (CDD11-style) are named by joining single degradations with ``+``, e.g.
``"lowlight+haze+rain"``; they apply in the physical order haze, rain, blur, lowlight, noise
(scene, weather in front of it, camera), each with its own seed derived from ``seed``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SINGLE_DEGRADATIONS = ("noise", "rain", "haze", "blur", "lowlight")
# Strength at which noise() has the benchmark sigmas 15, 25, 50.
NOISE_STRENGTH = {15: 0.0, 25: 10.0 / 35.0, 50: 1.0}
_PHYSICAL_ORDER = ("haze", "rain", "blur", "lowlight", "noise")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _check_image(clean: torch.Tensor) -> None:
    if not isinstance(clean, torch.Tensor):
        raise TypeError(f"clean must be a torch.Tensor, got {type(clean).__name__}")
    if clean.dim() != 3 or clean.shape[0] != 3:
        raise ValueError(f"clean must have shape [3, H, W], got {tuple(clean.shape)}")
    if not clean.is_floating_point():
        raise TypeError(f"clean must be a floating-point tensor in [0, 1], got dtype {clean.dtype}")


def _check_strength(strength: float) -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return float(strength)


def _filter(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel of [C, H, W] with a 2-D kernel ('same' size, edges replicated)."""
    kh, kw = kernel.shape
    padded = F.pad(image[None], (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2), mode="replicate")
    weight = kernel.flip(0, 1).to(image.dtype).expand(image.shape[0], 1, kh, kw)
    return F.conv2d(padded, weight, groups=image.shape[0])[0]


def noise_sigma(strength: float) -> float:
    """Noise standard deviation on the 0-255 scale for a given strength."""
    return 15.0 + 35.0 * _check_strength(strength)


def noise(clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Additive white Gaussian noise, sigma = ``noise_sigma(strength)`` / 255."""
    _check_image(clean)
    sigma = noise_sigma(strength) / 255.0
    n = torch.randn(clean.shape, generator=_generator(seed), dtype=torch.float32).to(clean.dtype)
    return (clean + sigma * n).clamp(0, 1)


def _line_kernel(length: int, angle: float) -> torch.Tensor:
    """A normalised anti-aliased line segment of ``length`` px through the centre at ``angle``."""
    size = length if length % 2 else length + 1
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # Streaks fall downward, tilted by ``angle``: direction (dy, dx) = (cos a, sin a); a cell's
    # weight falls linearly with its distance across the line.
    dy, dx = math.cos(angle), math.sin(angle)
    along = yy * dy + xx * dx
    across = (yy * dx - xx * dy).abs()
    kernel = (1 - across).clamp_min(0) * (along.abs() <= length / 2)
    return kernel / kernel.sum()


def rain(clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Rain streaks screen-blended over the image (see the module table for ranges)."""
    _check_image(clean)
    s = _check_strength(strength)
    gen = _generator(seed)
    angle = math.radians(_uniform(gen, -30.0, 30.0))
    length = int(round(7 + 14 * s))
    density = 0.005 + 0.015 * s
    brightness = _uniform(gen, 0.6, 1.0)
    h, w = clean.shape[1:]
    seeds = (torch.rand((1, h, w), generator=gen) < density).float() * torch.rand((1, h, w), generator=gen)
    streaks = _filter(seeds, _line_kernel(length, angle))
    # A streak's peak after smearing is about 1/length of its seed: rescale so streaks reach
    # ``brightness`` whatever their length.
    streaks = (streaks * length * brightness).clamp(0, 1).to(clean.dtype)
    return 1 - (1 - clean) * (1 - streaks)


def _smooth_field(gen: torch.Generator, h: int, w: int, cells: int = 4) -> torch.Tensor:
    """A smooth random field in [0, 1]: coarse Gaussian noise upsampled bicubically."""
    coarse = torch.randn((1, 1, cells, cells), generator=gen)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0]
    return (field - field.min()) / (field.max() - field.min()).clamp_min(1e-6)


def haze_depth(h: int, w: int, seed: int) -> torch.Tensor:
    """The depth proxy of ``haze``: a vertical ramp (far at the top) plus a smooth random field,
    normalised to [0, 1]."""
    gen = _generator(seed)
    ramp = torch.linspace(1.0, 0.0, h)[:, None].expand(h, w)
    depth = 0.6 * ramp + 0.4 * _smooth_field(gen, h, w)
    return (depth - depth.min()) / (depth.max() - depth.min()).clamp_min(1e-6)


def haze(clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Atmospheric scattering I = J t + A (1 - t) with t = exp(-beta * depth)."""
    _check_image(clean)
    s = _check_strength(strength)
    gen = _generator(seed)
    beta = 0.4 + 1.6 * s
    airlight = _uniform(gen, 0.75, 0.95)
    depth = haze_depth(clean.shape[1], clean.shape[2], seed + 1)
    t = torch.exp(-beta * depth).to(clean.dtype)
    return (clean * t + airlight * (1 - t)).clamp(0, 1)


def motion_kernel(seed: int, strength: float) -> torch.Tensor:
    """A motion-blur kernel: a random-walk camera trajectory with momentum, rasterised bilinearly
    onto a square grid of 9-23 px and normalised to sum 1."""
    s = _check_strength(strength)
    gen = _generator(seed)
    size = 2 * int(round(4 + 7 * s)) + 1
    steps = 4 * size
    velocity = torch.randn(2, generator=gen)
    velocity = velocity / velocity.norm().clamp_min(1e-6)
    position = torch.zeros(2)
    points = []
    for _ in range(steps):
        velocity = velocity + 0.35 * torch.randn(2, generator=gen)
        velocity = velocity / velocity.norm().clamp_min(1e-6)
        position = position + 0.5 * velocity
        points.append(position.clone())
    path = torch.stack(points)
    path = path - (path.max(0).values + path.min(0).values) / 2  # centre the trajectory
    extent = path.abs().max().clamp_min(1e-6)
    path = path * min(1.0, (size // 2 - 1) / extent.item()) + size // 2
    kernel = torch.zeros(size, size)
    for y, x in path.tolist():
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        fy, fx = y - y0, x - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < size and 0 <= x0 + dx < size:
                    kernel[y0 + dy, x0 + dx] += wy * wx
    return kernel / kernel.sum()


def gaussian_kernel(strength: float) -> torch.Tensor:
    """An isotropic Gaussian kernel, sigma = 0.8 + 2.2 * strength, radius 3 sigma, sum 1."""
    sigma = 0.8 + 2.2 * _check_strength(strength)
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def blur(clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Motion-trajectory blur or Gaussian blur (an even draw from the seed)."""
    _check_image(clean)
    s = _check_strength(strength)
    use_motion = torch.rand((), generator=_generator(seed)).item() < 0.5
    kernel = motion_kernel(seed + 1, s) if use_motion else gaussian_kernel(s)
    return _filter(clean, kernel).clamp(0, 1)


def lowlight(clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Low light: gamma darkening and scaling, then Poisson (shot) and Gaussian (read) noise."""
    _check_image(clean)
    s = _check_strength(strength)
    gen = _generator(seed)
    gamma = 1.5 + 1.5 * s
    scale = 0.7 - 0.4 * s
    peak = 200.0 - 150.0 * s
    dark = scale * clean.float().clamp(0, 1) ** gamma
    shot = torch.poisson(dark * peak, generator=gen) / peak
    read = 0.01 * torch.randn(clean.shape, generator=gen)
    return (shot + read).clamp(0, 1).to(clean.dtype)


DEGRADATIONS: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "noise": noise, "rain": rain, "haze": haze, "blur": blur, "lowlight": lowlight,
}


def parse_task(task: str) -> tuple[str, ...]:
    """The single degradations of a task name (``"haze+rain"`` -> ("haze", "rain")), in the
    physical order they are applied."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}")
    parts = task.split("+")
    unknown = [p for p in parts if p not in DEGRADATIONS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"task {task!r}: each part must be one of {SINGLE_DEGRADATIONS}, without repeats")
    return tuple(p for p in _PHYSICAL_ORDER if p in parts)


def degrade(task: str, clean: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Apply a single or composite degradation (``"noise"``, ``"lowlight+haze+rain"``, ...)."""
    parts = parse_task(task)
    out = clean
    for index, name in enumerate(parts):
        out = DEGRADATIONS[name](out, seed * 7919 + index if len(parts) > 1 else seed, strength)
    return out

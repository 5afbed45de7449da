"""MiM-DiT's sampler, the model's ``restore``: diffusers' ``FlowMatchEulerDiscreteScheduler``
over a few Euler steps, from pure noise (strength 1) or from the degraded image plus noise at
t = strength (more fidelity, fewer steps needed)."""
from __future__ import annotations

import torch


@torch.no_grad()
def restore(model, degraded: torch.Tensor, *, steps: int | None = None, strength: float = 1.0,
            generator: torch.Generator | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
    """Restore degraded images [B, 3, H, W] in [0, 1] with ``steps`` Euler steps (default: the
    configuration's ``sample_steps``). ``context`` replaces the degradation encoder's embedding
    (e.g. DA-CLIP features)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = steps or model.config.sample_steps
    cond = model.encode(degraded)
    if context is None:
        context, _ = model.degradation_context(degraded)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sigmas = [strength * (1 - i / steps) for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, device=degraded.device)
    noise = torch.randn(cond.shape, device=cond.device, generator=generator, dtype=cond.dtype)
    x = strength * noise + (1 - strength) * cond
    for timestep in scheduler.timesteps:
        v = model(x, cond, timestep.expand(x.shape[0]), context)
        x = scheduler.step(v, timestep, x).prev_sample
    return model.decode(x)

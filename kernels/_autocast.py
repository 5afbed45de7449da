"""The autocast policy, one for every op.

Under ``torch.autocast(device_type)`` an op casts the floating-point inputs it computes with in the
input dtype to the autocast dtype (``moe_mlp``: x and the expert parameters; the scans: u, f, Bm,
Cm, z) and then runs as for inputs of that dtype (float32 accumulation and state; the output in
the autocast dtype). Inputs an op reads in float32 whatever their dtype are left alone: router
logits (so routing under autocast is the routing of the logits as given), routing weights,
d_skip and h0.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple:
    """Apply the autocast policy (module docstring) to the tensors an op computes with: cast the
    floating-point ones to the autocast dtype of the first one's device when autocast is on there,
    else return them as they are (None entries pass through). The op then computes inside
    ``autocast_off``."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type`` while an op computes on its cast inputs (so
    that the torch backends' float32 arithmetic stays float32); a no-op when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()

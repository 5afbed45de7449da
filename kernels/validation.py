"""Input validation shared by the public ops: every error names the argument at fault."""
from __future__ import annotations

import torch

from ._backend import check_backend

__all__ = ["check_backend", "check_bool", "check_finite_non_negative", "check_float", "check_has_values", "check_ndim", "check_positive_int", "check_same_device", "check_shape",
           "check_tensor"]


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object) -> torch.Tensor:
    t = check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None entries skipped) share one device; return it."""
    present = [t for t in tensors.values() if t is not None]
    device = present[0].device
    if any(t.device != device for t in present[1:]):  # the message only on failure: ops call this per call
        where = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
        raise ValueError(f"all tensors must be on one device, got {where}")
    return device


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (a flag given 0, "yes" or None would silently mean something)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_finite_non_negative(name: str, value: object) -> float:
    """``value`` if it is a finite real number >= 0 (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_has_values(name: str, t: torch.Tensor) -> None:
    """Raise for a tensor on the meta device: it has a shape but no values, and the ops compute
    values (routing reads them even for the shapes of its outputs)."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values); the ops need tensors with "
                         "values: materialise the model first (module.to_empty(device=...) and load its weights)")

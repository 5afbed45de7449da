"""Backend rule shared by every public op, and the kernel-configuration policy.

Every public op takes ``backend: str | None``:

* ``"triton"`` runs the Triton kernel: on CUDA tensors, or on CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were defined, i.e. before
  ``moe_restore.kernels`` was first imported). Anything else raises ``RuntimeError``.
* ``"torch"`` runs the vectorised eager PyTorch implementation (the CPU path and the profiling
  baseline).
* ``None`` picks ``"triton"`` where it can run, else ``"torch"``.

Kernel configurations: on a GPU each kernel autotunes over a small pruned set keyed on its
shapes. ``MOE_RESTORE_AUTOTUNE=0`` pins every kernel to its default configuration, and
``MOE_RESTORE_CONFIG_<KERNEL>="BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3"`` pins one kernel
(``<KERNEL>`` is the kernel's name in upper case). Under the interpreter only the default
configuration is used: there is nothing to tune on a CPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable

import torch

BACKENDS = ("triton", "torch")

# Read once, at import: Triton decides at decoration time whether a kernel is interpreted, so a
# later change of the variable does not change how the kernels already defined run.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Apply the backend rule for tensors on ``device``; see the module docstring."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "torch":
        return "torch"
    runnable = triton_can_run(device)
    if backend == "triton" and not runnable:
        if not HAS_TRITON:
            why = "Triton is not installed"
        elif device.type == "cpu":
            why = "the tensors are on the CPU and TRITON_INTERPRET=1 was not set before import"
        else:
            why = f"Triton has no backend for device type {device.type!r}"
        raise RuntimeError(f"backend='triton' cannot run here: {why}; use backend='torch' or None")
    return "triton" if runnable else "torch"


def _parse_pinned(text: str) -> dict[str, int]:
    pinned = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"cannot parse kernel configuration item {item!r} (want KEY=INT)")
        pinned[key.strip()] = int(value)
    return pinned


def kernel_configs(kernel: str, default: dict[str, int], candidates: Iterable[dict[str, int]] = ()):
    """The ``triton.Config`` list a kernel autotunes over.

    ``default`` and each candidate map meta-parameter names to values, plus the optional
    launch keys ``num_warps`` and ``num_stages``.
    """
    import triton

    def to_config(params: dict[str, int]):
        meta = {k: v for k, v in params.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=params.get("num_warps", 4), num_stages=params.get("num_stages", 2))

    pinned = os.environ.get(f"MOE_RESTORE_CONFIG_{kernel.upper()}")
    if pinned:
        return [to_config({**default, **_parse_pinned(pinned)})]
    if INTERPRET or os.environ.get("MOE_RESTORE_AUTOTUNE", "1") == "0":
        return [to_config(default)]
    return [to_config(default)] + [to_config(c) for c in candidates if c != default]

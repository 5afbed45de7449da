"""Kernel configurations: autotuning, pinning, deterministic mode and tiles per tensor-core generation.

On a GPU each kernel autotunes over a small pruned set of configurations keyed on its shapes.
``MOE_RESTORE_AUTOTUNE=0`` pins every kernel to its default configuration, and
``MOE_RESTORE_CONFIG_<KERNEL>="BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3"`` pins one kernel
(``<KERNEL>`` is the kernel's name in upper case); both are read when a kernel is defined (see
``settings``). Under the interpreter only the default configuration is used: there is nothing to
tune on a CPU. A kernel whose tiles differ by tensor-core generation (``arch_autotune``) has one
configuration list for sm_90 to sm_11x (wgmma / tcgen05: 64-row tiles per warp group) and one for
the others (mma.sync); the interpreter runs the first's default.

Deterministic mode (``MOE_RESTORE_DETERMINISTIC=1``, or ``torch.use_deterministic_algorithms(True)``
in effect when the kernels are defined, i.e. at the first import of ``moe_restore.kernels``) pins
every kernel to its default configuration too: the kernels use no atomics, so with a fixed
configuration a result is bitwise reproducible, but an autotuner that times its candidates can
pick a different configuration (hence a different summation order) in another process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from . import settings


def deterministic() -> bool:
    """Whether deterministic mode is asked for (see the module docstring)."""
    return settings.deterministic_requested() or torch.are_deterministic_algorithms_enabled()


def kernel_configs(kernel: str, default: dict[str, int], candidates: Iterable[dict[str, int]] = ()):
    """The ``triton.Config`` list a kernel autotunes over.

    ``default`` and each candidate map meta-parameter names to values, plus the optional
    launch keys ``num_warps`` and ``num_stages``.
    """
    import triton

    def to_config(params: dict[str, int]):
        meta = {k: v for k, v in params.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=params.get("num_warps", 4), num_stages=params.get("num_stages", 2))

    pinned = settings.pinned_config(kernel)
    if pinned is not None:
        return [to_config({**default, **pinned})]
    if settings.INTERPRET or not settings.autotune() or deterministic():
        return [to_config(default)]
    return [to_config(default)] + [to_config(c) for c in candidates if c != default]


def aligned(*elements: int) -> bool:
    """Whether each width or stride (in elements) is 1 or a multiple of 16, which is what Triton's
    specialisation of integer arguments sees: only then can it prove each row of a tile 16-byte
    aligned and load it in vectors (a stride of 1 is the contiguous dimension). Otherwise every element is loaded through its own 64-bit address,
    and a kernel whose tiles fit at aligned widths can run out of registers: the compile check
    (docs/benchmarks.md) measured this at D=100, H=266, and such launches take their own configurations."""
    return all(e == 1 or e % 16 == 0 for e in elements)


def wide_tiles(major: int) -> bool:
    """Whether GPUs of compute capability ``major`` take the 64-row-per-warp-group tiles of
    wgmma (sm_90) or tcgen05 (sm_100 to sm_11x); the others (sm_80/86/89, sm_120) use mma.sync."""
    return 9 <= major < 12


@dataclass(frozen=True)
class ArchTuned:
    """One kernel autotuned over a configuration list per tensor-core generation (``wide_tiles``)."""

    wide: Any  # triton Autotuner
    narrow: Any

    def for_capability(self, major: int):
        return self.wide if wide_tiles(major) else self.narrow

    def for_device(self, device: torch.device):
        """The autotuner for tensors on ``device``; off CUDA (the interpreter) the wide one."""
        if device.type != "cuda":
            return self.wide
        return self.for_capability(torch.cuda.get_device_capability(device)[0])


def arch_autotune(fn, name: str, key: list[str], wide: tuple[dict, list[dict]], narrow: tuple[dict, list[dict]],
                  wide_prune: Callable | None = None, narrow_prune: Callable | None = None) -> ArchTuned:
    """``fn`` autotuned per tensor-core generation: ``wide`` and ``narrow`` are (default,
    candidates) as ``kernel_configs`` takes them, under the one pinning name ``name``;
    ``wide_prune`` / ``narrow_prune`` are the lists' ``early_config_prune``."""
    import triton

    def tuner(spec, prune):
        extra = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
        return triton.autotune(kernel_configs(name, *spec), key=key, **extra)(fn)

    return ArchTuned(tuner(wide, wide_prune), tuner(narrow, narrow_prune))

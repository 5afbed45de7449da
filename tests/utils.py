"""Shared test harness: one table of tolerances, one error measure, poisoned outputs, and the
inputs and visit names of the scan tests. The float64 oracles live in ``moe_restore.kernels.naive``.

Error measure: ``||out - ref|| / max(||ref||, tiny)`` in float64, against a float64 oracle.
Tolerances are per dtype of the op's inputs, in this one place:

=========  ==========  ==========================================================
dtype      rel. error  why
=========  ==========  ==========================================================
float64    1e-10       the torch backend in float64 against the oracle
float32    2e-5        float32 arithmetic, different summation order (interpreter)
float32    5e-3        on a GPU, where a float32 ``tl.dot`` uses tf32
float16    1e-2        fp16 operands (11-bit mantissa), float32 accumulation
bfloat16   3e-2        bf16 operands (8-bit mantissa), float32 accumulation
=========  ==========  ==========================================================
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}
_TF32_TOLERANCE = 5e-3


def tolerance(dtype: torch.dtype, *, backend: str = "torch") -> float:
    """Relative-error tolerance for an op whose inputs are ``dtype``."""
    if dtype == torch.float32 and backend == "triton" and DEVICE.type == "cuda":
        return _TF32_TOLERANCE
    return _TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, backend: str = "torch",
                 what: str = "output") -> None:
    """Assert ``rel_error(out, ref) <= tolerance(dtype)``; NaN or Inf never passes."""
    err = rel_error(out, ref)
    tol = tolerance(dtype, backend=backend)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype}, {backend})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the largest value for integer tensors) so that unwritten
    elements of a kernel's output show up."""
    if t.is_floating_point():
        return t.fill_(math.nan)
    return t.fill_(torch.iinfo(t.dtype).max)


def backends() -> list[str]:
    """Backends to test here: the torch backend always, Triton where it can run."""
    from moe_restore.kernels._backend import triton_can_run

    return ["torch", "triton"] if triton_can_run(DEVICE) else ["torch"]


def raising_backends() -> list[str]:
    """The backends that refuse a bad value (NaN scores, an inconsistent routing) with a Python
    exception in this process: the torch backend always, the Triton path only on the CPU. On a GPU
    the Triton path's refusal is a device-side assert that ends the CUDA context, which
    ``test_device_checks`` tests in a subprocess."""
    return [b for b in backends() if b == "torch" or DEVICE.type == "cpu"]


class poisoned_allocations:
    """Context manager: every ``torch.empty`` inside it returns memory filled with NaN (floats)
    or the largest integer, so an output element a kernel forgot to write fails the test.

    It uses PyTorch's own switch for this (``fill_uninitialized_memory``), which acts only while
    deterministic algorithms are on.
    """

    def __enter__(self):
        import torch.utils.deterministic as det

        self._saved = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(),
                       det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True
        return self

    def __exit__(self, *exc):
        import torch.utils.deterministic as det

        enabled, warn_only, fill = self._saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        det.fill_uninitialized_memory = fill
        return False


# The scan tests' names of the four visits of a grid, and the op's (order, reverse) for each.
VISITS = {"row": ("row", False), "row_reverse": ("row", True), "col": ("col", False), "col_reverse": ("col", True)}


def scan_2d(op: Callable, u: torch.Tensor, f: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, visit: str,
            **kwargs):
    """``op`` (``gated_scan_2d`` or the oracle ``naive.gated_scan_2d``) in the visit ``VISITS`` calls
    ``visit``."""
    order, reverse = VISITS[visit]
    return op(u, f, Bm, Cm, order=order, reverse=reverse, **kwargs)


def scan_inputs(lead: tuple[int, ...], dim: int, state: int, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                decay_scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    """u, f, Bm, Cm, d_skip, z, h0 of a gated scan on DEVICE, with leading dims ``lead`` = (B, L) or
    (B, H, W); d_skip and h0 float32, the others ``dtype``. f = N(1, decay_scale): mostly long
    memory, some suppression."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEVICE)  # noqa: E731
    batch = lead[0]
    u = rand(*lead, dim)
    f = rand(*lead, dim, scale=decay_scale) + 1.0
    Bm, Cm = rand(*lead, state), rand(*lead, state)
    d_skip, z = rand(dim), rand(*lead, dim)
    h0 = rand(batch, dim, state)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(u), cast(f), cast(Bm), cast(Cm), d_skip, cast(z), h0


def run_scan(backend: str, u, f, Bm, Cm, d_skip, z, h0, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, final state) of ``gated_scan`` on ``backend``, its outputs allocated poisoned."""
    from moe_restore.kernels.gated_scan import gated_scan

    with poisoned_allocations():
        return gated_scan(u, f, Bm, Cm, d_skip=d_skip, z=z, h0=h0, reverse=reverse,
                          return_final_state=True, backend=backend)


def skip_if_compiled_torch_backward_is_wrong(backend: str) -> None:
    """Skip a test of a compiled torch-backend backward on the torch versions where the op refuses
    it (``_moe_mlp_torch.COMPILED_BACKWARD_IS_WRONG``; tests/properties/test_compile.py checks the refusal)."""
    from moe_restore.kernels._moe_mlp_torch import COMPILED_BACKWARD_IS_WRONG

    if backend == "torch" and COMPILED_BACKWARD_IS_WRONG:
        pytest.skip(f"torch {torch.__version__}: the torch backend refuses a compiled backward (zero gradients)")

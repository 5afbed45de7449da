"""The backend rule shared by every public op: which implementation runs, and whether Triton can run here.

Every public op takes ``backend: str | None``:

* ``"triton"`` runs the Triton kernel: on CUDA tensors, or on CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were defined, i.e. before
  ``moe_restore.kernels`` was first imported). Anything else raises ``RuntimeError``.
* ``"torch"`` runs the vectorised eager PyTorch implementation (the CPU path and the profiling
  baseline).
* ``None`` picks ``"triton"`` where it can run, else ``"torch"``; and never a path that is wrong
  for the dtype: the expert MLP and the scan run float64 on "torch" only (their Triton kernels
  compute in float32), so ``None`` sends float64 there and ``"triton"`` raises ``TypeError``
  (``resolve_backend_for_dtype``). The per-op dtype table is in docs/kernels.md.

On CUDA, "can run" means that Triton compiles for this GPU: the first CUDA call per device
compiles and launches a one-element probe kernel. If that fails (a GPU older than Triton
supports, a broken toolchain), ``None`` falls back to ``"torch"`` with a warning that gives the
reason, and ``"triton"`` raises ``RuntimeError`` with it.

The Triton backward ops compute first derivatives only; ``refuse_double_backward`` is their
second-derivative formula, a clear refusal.

The other policies every op shares sit beside this module: ``_autocast`` (the autocast policy),
``_tuning`` (kernel configurations, autotuning, deterministic mode, tiles per tensor-core
generation), ``_interpreter`` (the Triton interpreter's quirks); every environment variable,
launch sizes included, is read in ``settings``.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from . import settings

BACKENDS = ("triton", "torch")
HAS_TRITON = importlib.util.find_spec("triton") is not None
if settings.INTERPRET and HAS_TRITON:
    from ._interpreter import squeeze_scalar_index

    squeeze_scalar_index()  # Triton 3.6's interpreter with numpy >= 2.4 (see _interpreter)


# Per CUDA device index: None when Triton compiles and runs there, else why not.
_CUDA_PROBES: dict[int, str | None] = {}


def _probe_cuda(device: torch.device) -> str | None:
    """Compile and launch a one-element Triton kernel on ``device``; the error text if that fails."""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _probe_kernel(ptr):
            tl.store(ptr, tl.load(ptr) + 1.0)

        t = torch.zeros(1, device=device)
        _probe_kernel[(1,)](t)
        if t.item() != 1.0:
            return "the probe kernel ran but computed a wrong result"
    except Exception as error:  # noqa: BLE001 - any failure means: do not use Triton here
        return f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return None


def _cuda_problem(device: torch.device) -> str | None:
    """Why Triton cannot run on the CUDA ``device`` (None if it can), probed once per device."""
    if torch.compiler.is_compiling():
        return None  # a compiled region: the eager calls before it have probed already
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if index not in _CUDA_PROBES:
        problem = _probe_cuda(torch.device("cuda", index))
        _CUDA_PROBES[index] = problem
        if problem is not None:
            warnings.warn(f"Triton cannot compile for cuda:{index} ({problem}); moe_restore ops with backend=None "
                          "fall back to the torch backend there", RuntimeWarning, stacklevel=3)
    return _CUDA_PROBES[index]


def triton_can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return _cuda_problem(device) is None
    return device.type == "cpu" and settings.INTERPRET


def check_backend(backend: object) -> str | None:
    """``backend`` if it is a backend name the ops take ("triton", "torch" or None), else
    ValueError; layers call it when they are built, so that a misspelt name fails there."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Apply the backend rule for tensors on ``device``; see the module docstring."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    runnable = triton_can_run(device)
    if backend == "triton" and not runnable:
        if not HAS_TRITON:
            why = "Triton is not installed"
        elif device.type == "cpu":
            why = "the tensors are on the CPU and TRITON_INTERPRET=1 was not set before import"
        elif device.type == "cuda":
            why = f"Triton cannot compile for this GPU ({_cuda_problem(device)})"
        else:
            why = f"Triton has no backend for device type {device.type!r}"
        raise RuntimeError(f"backend='triton' cannot run here: {why}; use backend='torch' or None")
    return "triton" if runnable else "torch"


def resolve_backend_for_dtype(backend: str | None, t: torch.Tensor, name: str) -> str:
    """``resolve_backend`` for an op whose Triton kernels take float32, float16 and bfloat16 only:
    float64 ``t`` runs on "torch" (``None``) or raises TypeError naming ``name`` ("triton")."""
    if backend is None and t.dtype == torch.float64:
        return "torch"
    backend = resolve_backend(backend, t.device)
    if backend == "triton" and t.dtype == torch.float64:
        raise TypeError(f"backend='triton' computes in float32 and takes float32, float16 or bfloat16; "
                        f"{name} is float64 (use backend='torch' or None)")
    return backend


def refuse_double_backward(op: str, alternative: str):
    """The autograd formula of a Triton backward op: its kernels compute first derivatives only,
    so a gradient of a gradient (``create_graph=True`` then backward again) raises
    NotImplementedError naming the op and what to use instead, rather than PyTorch's "no autograd
    formula was registered"."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"{op} on backend='triton' has no second derivative (a gradient of a gradient, "
                                  f"double backward); {alternative}")
    return backward

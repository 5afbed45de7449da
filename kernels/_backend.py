"""Backend rule shared by every public op, and the kernel-configuration policy.

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

Kernel configurations: on a GPU each kernel autotunes over a small pruned set keyed on its
shapes. ``MOE_RESTORE_AUTOTUNE=0`` pins every kernel to its default configuration, and
``MOE_RESTORE_CONFIG_<KERNEL>="BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3"`` pins one kernel
(``<KERNEL>`` is the kernel's name in upper case). Under the interpreter only the default
configuration is used: there is nothing to tune on a CPU. A kernel whose tiles differ by
tensor-core generation (``arch_autotune``) has one configuration list for sm_90 to sm_11x
(wgmma / tcgen05: 64-row tiles per warp group) and one for the others (mma.sync); the
interpreter runs the first's default.

Launch sizes: a few sizes that are not tile shapes are rules of the input size and the device,
the same rule under the interpreter as on a GPU, and each can be pinned by an environment
variable (read at every call):

* ``MOE_RESTORE_ROW_SPLITS=<n>``: parts each expert's rows are split into for the expert-MLP
  weight-gradient reductions (default: enough programs to fill a GPU's SMs; 1 off CUDA).
* ``MOE_RESTORE_SCAN_CHUNK=<tokens>``: tokens per chunk of the scan kernels, a power of two >= 16
  (default: 64 to 256, growing with the sequence length).
* ``MOE_RESTORE_SCAN_CARRY_BLOCK=<chunks>``: chunk states the scan's carry kernel combines per
  step, a power of two >= 2 (default 32).

The test suite pins small values (tests/conftest.py), so that its short inputs cross several
row splits, chunks and carry blocks.

Autocast (one policy for every op): under ``torch.autocast(device_type)`` an op casts the
floating-point inputs it computes with in the input dtype to the autocast dtype (``moe_mlp``: x
and the expert parameters; the scans: u, f, Bm, Cm, z) and then runs as for inputs of that dtype
(float32 accumulation and state; the output in the autocast dtype). Inputs an op reads in float32
whatever their dtype are left alone: router logits (so routing under autocast is the routing of
the logits as given), routing weights, d_skip and h0.

Deterministic mode (``MOE_RESTORE_DETERMINISTIC=1``, or ``torch.use_deterministic_algorithms(True)``
in effect when the kernels are defined, i.e. at the first import of ``moe_restore.kernels``) pins
every kernel to its default configuration too: the kernels use no atomics, so with a fixed
configuration a result is bitwise reproducible, but an autotuner that times its candidates can
pick a different configuration (hence a different summation order) in another process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

BACKENDS = ("triton", "torch")

# Read once, at import: Triton decides at decoration time whether a kernel is interpreted, so a
# later change of the variable does not change how the kernels already defined run.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
if INTERPRET and HAS_TRITON:
    from ._interpreter import squeeze_scalar_index

    squeeze_scalar_index()  # Triton 3.6's interpreter with numpy >= 2.4 (see _interpreter)


def deterministic() -> bool:
    """Whether deterministic mode is asked for (see the module docstring)."""
    return os.environ.get("MOE_RESTORE_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


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
    return device.type == "cpu" and INTERPRET


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


def launch_size(variable: str, default: int, *, power_of_two: bool = False, minimum: int = 1) -> int:
    """The launch size pinned by the environment ``variable`` (see the module docstring), else
    ``default``; a pinned value that is not an int >= ``minimum`` (and a power of two when
    asked) raises ValueError."""
    text = os.environ.get(variable)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < minimum or (power_of_two and value & (value - 1)):
        kind = "a power of two" if power_of_two else "an integer"
        raise ValueError(f"{variable} must be {kind} >= {minimum}, got {text!r}")
    return value
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


# True while the compile check records interpreted launches without executing them.
_LAUNCHES_ONLY = False


@contextlib.contextmanager
def launches_only():
    """A context in which interpreted kernel launches are recorded, not executed (the compile
    check's recorder), so that refusals which protect computed values do not apply."""
    global _LAUNCHES_ONLY
    saved, _LAUNCHES_ONLY = _LAUNCHES_ONLY, True
    try:
        yield
    finally:
        _LAUNCHES_ONLY = saved


def interpreter_dot_is_wrong(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a Triton ``tl.dot`` of ``dtype`` operands on ``device`` would compute wrong values:
    bfloat16 under the interpreter (measured: relative error 4e10 on a 7-token expert MLP; float16
    and float32 are right), unless launches are only recorded (``launches_only``)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and INTERPRET and not _LAUNCHES_ONLY


def refuse_double_backward(op: str, alternative: str):
    """The autograd formula of a Triton backward op: its kernels compute first derivatives only,
    so a gradient of a gradient (``create_graph=True`` then backward again) raises
    NotImplementedError naming the op and what to use instead, rather than PyTorch's "no autograd
    formula was registered"."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"{op} on backend='triton' has no second derivative (a gradient of a gradient, "
                                  f"double backward); {alternative}")
    return backward


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
    if INTERPRET or os.environ.get("MOE_RESTORE_AUTOTUNE", "1") == "0" or deterministic():
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

"""Compiling one recorded launch for a GPU target, with no GPU present, and reading the result.

Run in a process without ``TRITON_INTERPRET``: the kernels are then real ``JITFunction``s, and
Triton's own binder turns the recorded arguments into the signature, specialisation (16-byte
alignment, integers equal to 1 or divisible by 16) and constexprs that a launch on a GPU would
compile, at each autotune configuration the kernel's autotuner keeps after its pruning.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import tempfile

import torch

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use (opt-in maximum)
_ARCH = {90: "sm_90a", 80: "sm_80"}


class _FakeTensor:
    """What Triton's binder reads of a tensor argument: its dtype and its address."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = getattr(torch, dtype)
        self._ptr = 0x10000 if aligned else 0x10002

    def data_ptr(self) -> int:
        return self._ptr


def _value(spec):
    return _FakeTensor(spec["tensor"], spec["aligned"]) if isinstance(spec, dict) else spec


def kernel_and_configs(launch: dict, capability: int):
    """(the JITFunction, the configs its autotuner for sm_``capability`` keeps after pruning for
    these arguments, or [None] for a kernel without one)."""
    from triton.runtime.autotuner import Autotuner

    from ._tuning import ArchTuned

    module = importlib.import_module(launch["module"])
    fn = getattr(module, launch["kernel"])
    if isinstance(fn, Autotuner):  # decorated in place: the name is bound to the autotuner
        fn = fn.fn
    if launch.get("tuner") is None:
        return fn, [None]
    tuner = getattr(module, launch["tuner"])
    if isinstance(tuner, ArchTuned):
        tuner = tuner.for_capability(capability // 10)
    nargs = {k: _value(v) for k, v in launch["args"].items()}
    configs = tuner.configs
    if tuner.early_config_prune:
        configs = tuner.early_config_prune(configs, nargs, **{k: _value(v) for k, v in launch["kwargs"].items()})
    return fn, list(configs)


def config_label(config) -> str:
    if config is None:
        return "-"
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta}{',' if meta else ''}w{config.num_warps},s{config.num_stages}"


_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*?-> tensor<(\d+)x(\d+)x\w+, #(\w+)")
_OPERAND = re.compile(r"(?:tensor|memdesc)<(\d+)x(\d+)x(\w+)")


def _dots(ttgir: str) -> list[dict]:
    """Each dot of the TTGIR: what it lowered to and its M x N x K (operand dtype)."""
    layouts = dict(re.findall(r"^#(\w+) = #ttg\.(\w+)", ttgir, re.M))
    versions = dict(re.findall(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir, re.M))
    dots = []
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        op, rows, cols, layout = m.groups()
        a = _OPERAND.search(line.split(":", 1)[1])
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        elif layouts.get(layout) == "nvidia_mma":
            kind = "wgmma" if versions.get(layout) == "3" else "mma.sync"
        else:
            kind = "fma"
        dots.append({"kind": kind, "m": int(rows), "n": int(cols), "k": int(a.group(2)), "dtype": a.group(3)})
    return dots


def _sass_counts(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-c", f.name], check=True, capture_output=True, text=True).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA")}


def build(launch: dict, config, capability: int) -> dict:
    """Compile ``launch`` at ``config`` for sm_``capability``; the resource and dot report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel_and_configs(launch, capability)[0]
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = {k: _value(v) for k, v in launch["kwargs"].items()}
    if config is not None:
        kwargs.update(config.all_kwargs())
    args = [_value(v) for v in launch["args"].values()]
    args = [a for a, name in zip(args, launch["args"]) if name not in kwargs]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    row = {"kernel": launch["kernel"], "target": _ARCH[capability], "config": config_label(config)}
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compile error is a result to report
        return {**row, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
    regs, frame = _REGS.search(log.getvalue()), _FRAME.search(log.getvalue())
    if regs is None or frame is None:
        return {**row, "error": "no ptxas resource report (is TRITON_ALWAYS_COMPILE=1 set?)"}
    stack, spill_st, spill_ld = (int(g) for g in frame.groups())
    dots = _dots(kernel.asm["ttgir"])
    return {**row, "regs": int(regs.group(1)), "stack": stack, "spill": spill_st + spill_ld, "smem": kernel.metadata.shared,
            "smem_limit": SMEM_LIMIT[capability], "dots": dots, "sass": _sass_counts(kernel.asm["cubin"]),
            "error": None}

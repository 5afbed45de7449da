"""Recording the Triton launches of the public ops, for the compile check.

Run in a process with ``TRITON_INTERPRET=1``: every launch of an interpreted kernel is
intercepted and recorded as (kernel module and name, each argument's kind: a tensor's dtype and
16-byte alignment, an integer's or flag's value, and the launch-site constexprs). The routing
kernels are executed (their counts drive the host-side dispatch); the expert-MLP and scan kernels
are not (only their widths matter), so realistic widths cost no interpreter time. The recorded T
is small; the widths, dtypes, strides and flags are the ones a GPU run at that width would use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

# (kernel-shape case name, what it runs); the widths are the benchmark suites' (benchmarks/moe.py S1-S3,
# nested.py DiT/pixel, scan.py) plus the fused path's widest widths (128; 32 for
# float32 swiglu), the grouped path just past them (256) and the scan's N=1 / N=64.
MOE_SHAPES = {  # name: (D, H, E, k, activation)
    "S1": (64, 128, 8, 2, "gelu"), "S2": (768, 3072, 8, 2, "gelu"), "S3": (2048, 768, 128, 8, "swiglu"),
    "F32": (32, 64, 8, 2, "swiglu"), "F128": (128, 256, 8, 2, "gelu"), "F256": (256, 512, 8, 2, "gelu"),
}
SWEPT = ("S1", "F128", "F256")  # the shapes run at every activation
FUSED_ACTIVATIONS = ("gelu", "silu", "relu", "swiglu", "gelu_tanh")
NESTED_SHAPES = {"DiT": (768, 3072, 5, 4, 2, 1), "pixel": (64, 128, 5, 4, 2, 2)}  # D, H, G, E, kg, ke
SCAN_SHAPES = {"scan-D192": (192, 16), "scan-D96": (96, 16), "scan-N1": (64, 1), "scan-N64": (64, 64)}  # D, N
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TOKENS = 32  # T: a multiple of 16, like the benchmark token counts


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[torch.dtype], None]


def _param(*shape, dtype):
    return torch.randn(*shape).to(dtype).requires_grad_()


def _moe_case(D, H, E, k, activation):
    def run(dtype):
        from moe_restore.kernels import moe_mlp, topk_route
        x = _param(_TOKENS, D, dtype=dtype)
        logits = _param(_TOKENS, E, dtype=dtype)
        h1 = 2 * H if activation == "swiglu" else H
        w1, w2 = _param(E, D, h1, dtype=dtype), _param(E, H, D, dtype=dtype)
        b1, b2 = _param(E, h1, dtype=dtype), _param(E, D, dtype=dtype)
        out = moe_mlp(x, topk_route(logits, k, backend="triton"), w1, w2, b1, b2, activation=activation,
                      backend="triton")
        out.float().sum().backward()
    return run


def _nested_case(D, H, G, E, kg, ke):
    def run(dtype):
        from moe_restore.kernels import moe_mlp, nested_route
        x = _param(_TOKENS, D, dtype=dtype)
        gl, el = _param(_TOKENS, G, dtype=dtype), _param(_TOKENS, G, E, dtype=dtype)
        w1, w2 = _param(G * E, D, H, dtype=dtype), _param(G * E, H, D, dtype=dtype)
        out = moe_mlp(x, nested_route(gl, el, kg, ke, backend="triton"), w1, w2, backend="triton")
        out.float().sum().backward()
    return run


def _scan_case(D, N, two_d=False):
    def run(dtype):
        from moe_restore.kernels import gated_scan, gated_scan_2d
        if two_d:
            u, f = _param(2, 8, 8, D, dtype=dtype), _param(2, 8, 8, D, dtype=dtype)
            bm, cm = _param(2, 8, 8, N, dtype=dtype), _param(2, 8, 8, N, dtype=dtype)
            y = gated_scan_2d(u, f, bm, cm, order="col", backend="triton")
        else:
            u, f = _param(2, 256, D, dtype=dtype), _param(2, 256, D, dtype=dtype)
            bm, cm = _param(2, 256, N, dtype=dtype), _param(2, 256, N, dtype=dtype)
            z, d_skip = _param(2, 256, D, dtype=dtype), _param(D, dtype=torch.float32)
            y = gated_scan(u, f, bm, cm, d_skip=d_skip, z=z, backend="triton")
        y.float().sum().backward()
    return run


def all_cases() -> dict[str, Case]:
    """Every case by name: MoE shapes (S1/F128/F256 at every activation), nested, scans."""
    cases = {}
    for name, (D, H, E, k, act) in MOE_SHAPES.items():
        acts = FUSED_ACTIVATIONS if name in SWEPT else (act,)
        for a in acts:
            label = name if a == act else f"{name}-{a}"
            cases[label] = Case(label, _moe_case(D, H, E, k, a))
    for name, shape in NESTED_SHAPES.items():
        cases[f"nested-{name}"] = Case(f"nested-{name}", _nested_case(*shape))
    for name, (D, N) in SCAN_SHAPES.items():
        cases[name] = Case(name, _scan_case(D, N))
    cases["scan2d-D96"] = Case("scan2d-D96", _scan_case(96, 16, two_d=True))
    return cases


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def record(case_names: list[str], dtype_names: list[str]) -> list[dict]:
    """The distinct launches of the named cases at the named dtypes (see the module docstring)."""
    from triton.runtime.interpreter import InterpretedFunction

    from ._backend import launches_only

    cases = all_cases()
    launches: dict[str, dict] = {}
    original = InterpretedFunction.run
    current: list[str] = []

    def intercept(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        bound = dict(zip(self.arg_names, args))
        entry = {"module": fn.__module__, "kernel": fn.__name__,
                 "args": {k: _describe(v) for k, v in bound.items()},
                 "kwargs": {k: _describe(v) for k, v in kwargs.items()}}
        key = json.dumps(entry, sort_keys=True)
        launches.setdefault(key, {**entry, "cases": []})
        if current[0] not in launches[key]["cases"]:
            launches[key]["cases"].append(current[0])
        if "routing" in fn.__module__:  # cheap, and the dispatch reads their results
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    # The launches use the default launch sizes (a test run pins smaller ones; this runs in its
    # own process, so unpinning them here changes nothing else).
    for variable in ("MOE_RESTORE_SCAN_CHUNK", "MOE_RESTORE_SCAN_CARRY_BLOCK", "MOE_RESTORE_ROW_SPLITS"):
        os.environ.pop(variable, None)
    InterpretedFunction.run = intercept
    try:
        with launches_only():  # the expert-MLP kernels are not executed: no bf16 dot is computed
            for case_name in case_names:
                for dtype_name in dtype_names:
                    current[:] = [f"{case_name}/{dtype_name}"]
                    torch.manual_seed(0)
                    cases[case_name].run(DTYPES[dtype_name])
    finally:
        InterpretedFunction.run = original
    return list(launches.values())

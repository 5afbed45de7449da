"""Recording the Triton launches of the public ops, for the compile check.

Run in a process with ``TRITON_INTERPRET=1``: every launch of an interpreted kernel is
intercepted and recorded as (kernel module and name, each argument's kind: a tensor's dtype and
16-byte alignment, an integer's or flag's value, and the launch-site constexprs). The routing
kernels are executed (their counts drive the host-side dispatch); the expert-MLP and scan kernels
are not (only their widths matter), so realistic widths cost no interpreter time. A launch through an
autotuner also records the module attribute that holds it (a kernel can have several, chosen per
launch, e.g. for unaligned widths). The recorded T is small; the widths, dtypes, strides and flags are the ones a GPU run at that width would use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .activations import ActivationSpec, first_layer_width

# (kernel-shape case name, what it runs); the widths are the benchmark suites' (benchmarks/moe.py S1-S3,
# nested.py DiT/pixel, scan.py) plus the fused path's widest widths (128; 32 for
# float32 swiglu), the grouped path just past them (256) and the scan's N=1 / N=64.
MOE_SHAPES = {  # name: (D, H, E, k, activation)
    "S1": (64, 128, 8, 2, "gelu"), "S2": (768, 3072, 8, 2, "gelu"), "S3": (2048, 768, 128, 8, "swiglu"),
    "F32": (32, 64, 8, 2, "swiglu"), "F128": (128, 256, 8, 2, "gelu"), "F256": (256, 512, 8, 2, "gelu"),
}
SWEPT = ("S1", "F128", "F256")  # the shapes run at every activation
FUSED_ACTIVATIONS = ("gelu", "silu", "relu", "swiglu", "gelu_tanh")
# Users' shapes, which the benchmark widths miss: widths that are not multiples of 16 (masked
# tiles, unspecialised strides), no bias, expert counts whose padded BLOCK_E is 16 to 512.
# name: (D, H, E, k, activation, bias); "U100" (the fused path's odd width) and "U300" (the grouped
# path's) run at every activation, with and without bias; m2ir's ADEC levels (models registry:
# dim 48 x 2^level, hidden int(2.66 dim), E=6, k=2; m2ir-small dim 32, hidden 85); the experts of the
# transformers families (swiglu, no bias) at E/k of OLMoE (64/8), DeepSeek-V3 (256/8), Kimi-K2 (384/8),
# at smaller widths than theirs (the weights are materialised here; a grouped-path build depends on
# the widths' divisibility by 16, not their size).
USER_SHAPES = {
    **{f"U100-{a}{s}": (100, 266, 8, 2, a, b) for a in FUSED_ACTIVATIONS for s, b in (("", True), ("-nobias", False))},
    **{f"U300-{a}{s}": (300, 798, 20, 4, a, b) for a in FUSED_ACTIVATIONS for s, b in (("", True), ("-nobias", False))},
    "m2ir-48": (48, 127, 6, 2, "gelu", True), "m2ir-96": (96, 255, 6, 2, "gelu", True),
    "m2ir-192": (192, 510, 6, 2, "gelu", True), "m2ir-small-32": (32, 85, 6, 2, "gelu", True),
    "hf-E64-k8": (512, 256, 64, 8, "swiglu", False), "hf-E256-k8": (256, 128, 256, 8, "swiglu", False),
    "hf-E384-k8": (256, 128, 384, 8, "swiglu", False),
    # the activation specs of the transformers families (canonical strings, see activations.py):
    # GPT-OSS (clamped, slope 1.702, up + 1, interleaved), Step-3.7 (SiLU then clamp), Gemma 4
    # (tanh-GELU gate), Nemotron-H (ReLU^2), and the erf-GELU gate at the odd width
    "spec-gptoss-S1": (64, 128, 8, 2, str(ActivationSpec("swiglu", limit=7.0, alpha=1.702, up_offset=1.0,
                                                           interleaved=True)), True),
    "spec-gptoss-S3": (2048, 768, 128, 8, str(ActivationSpec("swiglu", limit=7.0, alpha=1.702, up_offset=1.0,
                                                               interleaved=True)), False),
    "spec-clamp-after-S1": (64, 128, 8, 2, str(ActivationSpec("swiglu", limit=7.0, clamp_after=True)), False),
    "spec-geglu_tanh-S1": (64, 128, 8, 2, "geglu_tanh", False),
    "spec-relu2-F128": (128, 256, 8, 2, "relu2", False),
    "spec-geglu-U100": (100, 266, 8, 2, "geglu", False),
    # Inkling-2's softcapped SwiGLU (its config's caps: gate 4, up 25)
    "spec-inkling2-S1": (64, 128, 8, 2, str(ActivationSpec("swiglu", gate_softcap=4.0, up_softcap=25.0)), False),
}
# Routing alone at the transformers families' E/k and scorings (the blocks run ``topk_route``; the
# families with their own router only the dispatch): name: (E, k, scoring, renormalize).
ROUTE_SHAPES = {
    "route-E8-k2": (8, 2, "softmax", True),  # Mixtral, JetMoE
    "route-E16-k1": (16, 1, "sigmoid", False),  # Llama 4 (k=1)
    "route-E16-k4": (16, 4, "softmax", True),  # DBRX
    "route-E20-k4": (20, 4, "softmax", True),
    "route-E32-k4": (32, 4, "softmax", True),  # GPT-OSS-20B
    "route-E40-k8": (40, 8, "softmax", True),  # Granite MoE
    "route-E60-k4": (60, 4, "softmax", False),  # Qwen2-MoE (no renormalisation)
    "route-E64-k6": (64, 6, "softmax", False),  # DeepSeek-V2-Lite
    "route-E160-k6": (160, 6, "softmax", False),  # DeepSeek-V2
    "route-E256-k8": (256, 8, "sigmoid", True),  # DeepSeek-V3, GLM-4.5 (sigmoid scores)
    "route-E384-k8": (384, 8, "sigmoid", True),  # Kimi-K2
}
NESTED_SHAPES = {"DiT": (768, 3072, 5, 4, 2, 1), "pixel": (64, 128, 5, 4, 2, 2),  # D, H, G, E, kg, ke
                 "mim-dit-s": (384, 1536, 5, 4, 2, 1)}
SCAN_SHAPES = {"scan-D192": (192, 16), "scan-D96": (96, 16), "scan-N1": (64, 1), "scan-N64": (64, 64),
               "scan-D100-N12": (100, 12)}  # D, N
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TOKENS = 32  # T: a multiple of 16, like the benchmark token counts


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[torch.dtype], None]


def _param(*shape, dtype):
    return torch.randn(*shape).to(dtype).requires_grad_()


def _moe_case(D, H, E, k, activation, bias=True):
    def run(dtype):
        from moe_restore.kernels import moe_mlp, topk_route
        x = _param(_TOKENS, D, dtype=dtype)
        logits = _param(_TOKENS, E, dtype=dtype)
        h1 = first_layer_width(activation, H)
        w1, w2 = _param(E, D, h1, dtype=dtype), _param(E, H, D, dtype=dtype)
        b1, b2 = (_param(E, h1, dtype=dtype), _param(E, D, dtype=dtype)) if bias else (None, None)
        # Both variants of the grouped path's kernels: z recomputed in backward, and z stored by the
        # up-projection and read by the hidden gradient (the fused path ignores the flag).
        for recompute_hidden in (True, False):
            out = moe_mlp(x, topk_route(logits, k, backend="triton"), w1, w2, b1, b2, activation=activation,
                          backend="triton", recompute_hidden=recompute_hidden)
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


def _route_case(E, k, scoring, renormalize):
    def run(dtype):
        from moe_restore.kernels import router_loss_stats, topk_route
        logits = _param(_TOKENS, E, dtype=dtype)
        routing = topk_route(logits, k, scoring=scoring, renormalize=renormalize, backend="triton")
        prob_sums, lse_sq_sum = router_loss_stats(logits, scoring, backend="triton")
        (routing.weights.sum() + prob_sums.sum() + lse_sq_sum).backward()
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
    """Every case by name: MoE shapes (S1/F128/F256 at every activation), users' shapes, routing
    alone, nested, scans."""
    cases = {}
    for name, (D, H, E, k, act) in MOE_SHAPES.items():
        acts = FUSED_ACTIVATIONS if name in SWEPT else (act,)
        for a in acts:
            label = name if a == act else f"{name}-{a}"
            cases[label] = Case(label, _moe_case(D, H, E, k, a))
    for name, shape in USER_SHAPES.items():
        cases[name] = Case(name, _moe_case(*shape))
    for name, shape in ROUTE_SHAPES.items():
        cases[name] = Case(name, _route_case(*shape))
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


def _tuner_name(tuner, module_name: str) -> str:
    """The attribute of ``module_name`` that holds ``tuner`` (an Autotuner, or an ``ArchTuned`` with it)."""
    import importlib

    for name, value in vars(importlib.import_module(module_name)).items():
        if value is tuner or tuner in (getattr(value, "wide", None), getattr(value, "narrow", None)):
            return name
    raise LookupError(f"no attribute of {module_name} holds the autotuner of {tuner.fn.__name__}")


def record(case_names: list[str], dtype_names: list[str]) -> list[dict]:
    """The distinct launches of the named cases at the named dtypes (see the module docstring)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    from ._interpreter import launches_only

    cases = all_cases()
    launches: dict[str, dict] = {}
    original, original_tuner = InterpretedFunction.run, Autotuner.run
    current: list[str] = []
    tuners: list = []  # the autotuners whose run is in progress

    def run_tuner(self, *args, **kwargs):
        tuners.append(self)
        try:
            return original_tuner(self, *args, **kwargs)
        finally:
            tuners.pop()

    def intercept(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        bound = dict(zip(self.arg_names, args))
        entry = {"module": fn.__module__, "kernel": fn.__name__,
                 "tuner": _tuner_name(tuners[-1], fn.__module__) if tuners and tuners[-1].fn is self else None,
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
    InterpretedFunction.run, Autotuner.run = intercept, run_tuner
    try:
        with launches_only():  # the expert-MLP kernels are not executed: no bf16 dot is computed
            for case_name in case_names:
                for dtype_name in dtype_names:
                    current[:] = [f"{case_name}/{dtype_name}"]
                    torch.manual_seed(0)
                    cases[case_name].run(DTYPES[dtype_name])
    finally:
        InterpretedFunction.run, Autotuner.run = original, original_tuner
    return list(launches.values())

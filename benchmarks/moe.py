"""Benchmark of the top-K MoE layer (TopKMoE: router, topk_route, moe_mlp): the Triton path and the
"torch" backend vs the eager loop over experts (index_select per expert, index_add back),
``torch._grouped_mm`` and transformers' ``eager`` and ``grouped_mm`` experts implementations.

    python -m benchmarks.moe [--quick]          (also: moe-restore bench moe)

Reports forward, backward and forward + backward times and the peak memory of forward + backward
(see ``layer_timing``), each implementation's speed-up and memory ratio against the eager loop,
its output error against the eager loop, and the Triton path's floor from the measured matmul
and copy rates. On a GPU: bf16 at the shapes S1-S3 (``--quick``: small shapes). Without a GPU the
script says that Triton timings need one, times the torch backend and the baselines at small
shapes, float32, as CPU wall time (medians and spreads from one interleaved run), and counts the Triton path's
saved bytes under the interpreter (in a subprocess with TRITON_INTERPRET=1 if this one lacks it).
A skew sweep moves tokens onto expert 0, from the router's own spread to every token; each suite
writes PNG charts beside its JSON when matplotlib is installed.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from moe_restore.kernels import settings
from moe_restore.layers import TopKMoE

from .baselines import grouped_mm_topk_moe, grouped_mm_unsupported, transformers_forward
from .eager_moe import eager_topk_moe
from .layer_timing import Impl, backend_forward, expert_flops, measure_impls, run_suite, training_floor_ms
from .memory import saved_bytes


@dataclass(frozen=True)
class MoEShape:
    name: str
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int
    activation: str = "gelu"

    @property
    def label(self) -> str:
        return (f"{self.name} T{self.tokens} D{self.dim} H{self.hidden} E{self.experts} k{self.top_k}"
                f"{'' if self.activation == 'gelu' else ' ' + self.activation}")


SHAPES = {
    "gpu": [MoEShape("S1", 131072, 64, 128, 8, 2), MoEShape("S2", 16384, 768, 3072, 8, 2),
            MoEShape("S3", 32768, 2048, 768, 128, 8, "swiglu")],
    "gpu_quick": [MoEShape("S1q", 16384, 64, 128, 8, 2), MoEShape("S2q", 2048, 768, 3072, 8, 2),
                  MoEShape("S3q", 2048, 2048, 768, 128, 8, "swiglu")],
    "cpu": [MoEShape("c1", 2048, 64, 128, 8, 2), MoEShape("c2", 256, 192, 384, 8, 2),
            MoEShape("c3", 256, 128, 96, 16, 4, "swiglu")],
    "cpu_quick": [MoEShape("cq1", 256, 64, 128, 8, 2), MoEShape("cq2", 256, 64, 64, 8, 2, "swiglu")],
}
SKEWS = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = ("fwd+bwd >= 5x the eager loop at S1 and S2; training peak memory <= 0.5x the eager loop's; "
           "S3 fwd+bwd < 28 ms on an H100")


def _layer_and_tokens(shape: MoEShape, dtype: torch.dtype, device: torch.device, skew: float):
    """The shape's layer and tokens x; a fraction ``skew`` of the tokens gets a shift along which
    the router prefers expert 0 (then 1, ...), so that skew 1 sends every token to expert 0."""
    torch.manual_seed(0)
    layer = TopKMoE(shape.dim, shape.hidden, shape.experts, shape.top_k, activation=shape.activation)
    x = torch.randn(shape.tokens, shape.dim)
    if skew:
        target = torch.zeros(shape.experts)
        target[:shape.top_k] = 8.0 * torch.arange(shape.top_k, 0, -1)
        shift = torch.linalg.pinv(layer.router.weight.detach()) @ target
        x[:round(skew * shape.tokens)] += shift
    layer = layer.to(device=device, dtype=dtype)
    return layer, x.to(device=device, dtype=dtype).requires_grad_()


def triton_saved_bytes_per_token(shape: MoEShape, dtype: torch.dtype, device: torch.device, skew: float) -> float:
    """The Triton path's saved bytes per token: here if Triton runs (GPU or interpreter), else in
    a subprocess under TRITON_INTERPRET=1."""
    if device.type == "cuda" or settings.INTERPRET:
        layer, x = _layer_and_tokens(shape, dtype, device, skew)
        return saved_bytes(backend_forward(layer, "triton"), x, layer.parameters()) / shape.tokens
    code = ("import json, sys, torch; from moe_restore.benchmarks.moe import MoEShape, triton_saved_bytes_per_token; "
            "a = json.loads(sys.argv[1]); print(triton_saved_bytes_per_token(MoEShape(**a['shape']), "
            "getattr(torch, a['dtype']), torch.device('cpu'), a['skew']))")
    print(f"{shape.label}: counting the Triton path's saved bytes under the interpreter (a subprocess) ...",
          flush=True)
    arg = json.dumps({"shape": asdict(shape), "dtype": str(dtype).replace("torch.", ""), "skew": skew})
    done = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    return float(done.stdout.split()[-1])


def bench_shape(shape: MoEShape, dtype: torch.dtype, device: torch.device,
                rates: tuple[float, float] | None, skew: float | None = None) -> list[dict]:
    layer, x = _layer_and_tokens(shape, dtype, device, skew or 0.0)
    floor = training_floor_ms(expert_flops(shape.tokens, shape.top_k, shape.dim, shape.hidden, shape.activation),
                              x, layer, rates)
    backends = ("triton", "torch") if device.type == "cuda" else ("torch",)
    impls = [Impl(b, backend_forward(layer, b), layer, floor_ms=floor if b == "triton" else None)
             for b in backends]
    why_not = grouped_mm_unsupported(layer, x)
    if why_not is None:
        impls.append(Impl("grouped_mm", functools.partial(grouped_mm_topk_moe, layer), layer))
    else:
        print(f"{shape.label}: no grouped_mm row: {why_not}")
    for name in ("eager", "grouped_mm"):
        forward = transformers_forward(layer, name)
        if forward is not None and (name == "eager" or why_not is None):
            impls.append(Impl(f"transformers {name}", forward, layer))
    eager = Impl("eager loop", functools.partial(eager_topk_moe, layer), layer)
    label = shape.label if skew is None else f"{shape.label} skew {skew:.2f}"
    rows = measure_impls(label, impls, x, eager)
    if device.type != "cuda" and skew is None:
        saved = triton_saved_bytes_per_token(shape, dtype, device, 0.0)
        rows.insert(0, {"shape": label, "implementation": "triton", "fwd_ms": None, "bwd_ms": None,
                        "fwd_bwd_ms": None, "peak_mb": None, "saved_bytes_per_token": saved,
                        "saved_vs_eager": saved / rows[-1]["saved_bytes_per_token"], "rel_err_vs_eager": None,
                        "floor_ms": None})
    if skew is not None:
        counts = layer.last_routing.expert_counts() if layer.last_routing is not None else None
        for row in rows:
            row["skew"] = skew
            row["max_expert_share"] = None if counts is None else counts.max().item() / shape.tokens
    return rows


def skew_sweep(shapes: list[MoEShape], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """bench_shape at each of SKEWS for the first shape (no Triton row on the CPU)."""
    return [row for skew in SKEWS for row in bench_shape(shapes[0], dtype, device, None, skew)]


def main(argv: list[str] | None = None) -> int:
    return run_suite("moe", __doc__.split("\n\n")[0], SHAPES, TARGETS, bench_shape, argv, sweep=skew_sweep)


if __name__ == "__main__":
    sys.exit(main())

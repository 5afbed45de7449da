"""Benchmark of the top-K MoE layer (TopKMoE: router, topk_route, moe_mlp): the Triton path vs the
"torch" backend vs the eager loop over experts (index_select per expert, index_add back).

    python -m benchmarks.moe [--quick]          (also: moe-restore bench moe)

Reports forward, backward and forward + backward times and the peak memory of forward + backward
(see ``layer_timing``), each implementation's speed-up and memory ratio against the eager loop,
its output error against the eager loop, and the Triton path's floor from the measured matmul
and copy rates. On a GPU: bf16 at the shapes S1-S3 (``--quick``: small shapes). Without a GPU the
script says that Triton timings need one and times the torch backend against the eager loop at
small shapes, float32, as CPU wall time.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from moe_restore.layers.moe import TopKMoE

from .eager_moe import eager_topk_moe
from .layer_timing import Impl, backend_forward, expert_flops, measure_impls, run_suite, training_floor_ms


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
    "cpu_quick": [MoEShape("cq", 128, 32, 64, 4, 2)],
}
TARGETS = ("fwd+bwd >= 5x the eager loop at S1 and S2; training peak memory <= 0.5x the eager loop's; "
           "S3 fwd+bwd < 28 ms on an H100")


def bench_shape(shape: MoEShape, dtype: torch.dtype, device: torch.device,
                rates: tuple[float, float] | None) -> list[dict]:
    torch.manual_seed(0)
    layer = TopKMoE(shape.dim, shape.hidden, shape.experts, shape.top_k, activation=shape.activation)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    floor = training_floor_ms(expert_flops(shape.tokens, shape.top_k, shape.dim, shape.hidden, shape.activation),
                              x, layer, rates)
    backends = ("triton", "torch") if device.type == "cuda" else ("torch",)
    impls = [Impl(b, backend_forward(layer, b), layer, floor_ms=floor if b == "triton" else None)
             for b in backends]
    eager = Impl("eager loop", functools.partial(eager_topk_moe, layer), layer)
    return measure_impls(shape.label, impls, x, eager)


def main(argv: list[str] | None = None) -> int:
    return run_suite("moe", __doc__.split("\n\n")[0], SHAPES, TARGETS, bench_shape, argv)


if __name__ == "__main__":
    sys.exit(main())

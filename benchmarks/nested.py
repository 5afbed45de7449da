"""Benchmark of the nested (MoE-in-MoE) layer (NestedMoE: two routers, nested_route, moe_mlp): the
Triton path vs the "torch" backend vs the eager two-level loop (for each group, for each of its
sub-experts: index_select, MLP, index_add), and against flattening to a single-level TopKMoE with
the same number of experts (G*E) and the same assignments per token (k_g*k_e).

    python -m benchmarks.nested [--quick]       (also: moe-restore bench nested)

Columns as in ``benchmarks.moe``, plus ``fwd_bwd_vs_flat``: a nested row's forward + backward
time over the flattened single-level layer's on the same backend (the cost of the nesting). On
a GPU: bf16 at the DiT-token and pixel-token shapes (``--quick``: small shapes). Without a GPU the
script says that Triton timings need one and times the torch backend only, at small shapes,
float32, as CPU wall time; under TRITON_INTERPRET=1 the Triton rows carry saved bytes only.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from moe_restore.kernels import settings
from moe_restore.layers import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE

from .eager_moe import eager_nested_moe
from .layer_timing import Impl, backend_forward, expert_flops, measure_impls, run_suite, training_floor_ms


@dataclass(frozen=True)
class NestedShape:
    name: str
    tokens: int
    dim: int
    hidden: int
    groups: int
    experts_per_group: int
    top_k_groups: int
    top_k_experts: int

    @property
    def label(self) -> str:
        return (f"{self.name} T{self.tokens} D{self.dim} H{self.hidden} G{self.groups} E{self.experts_per_group} "
                f"kg{self.top_k_groups} ke{self.top_k_experts}")


SHAPES = {
    "gpu": [NestedShape("DiT", 16384, 768, 3072, 5, 4, 2, 1), NestedShape("pixel", 131072, 64, 128, 5, 4, 2, 2)],
    "gpu_quick": [NestedShape("DiTq", 2048, 768, 3072, 5, 4, 2, 1), NestedShape("pixelq", 16384, 64, 128, 5, 4, 2, 2)],
    "cpu": [NestedShape("c-DiT", 256, 192, 384, 5, 4, 2, 1), NestedShape("c-pixel", 2048, 64, 128, 5, 4, 2, 2)],
    "cpu_quick": [NestedShape("cq", 128, 32, 64, 3, 2, 2, 1)],
}
TARGETS = "fwd+bwd within 10% of the flattened single-level layer and >= 5x the eager two-level loop"


def bench_shape(shape: NestedShape, dtype: torch.dtype, device: torch.device,
                rates: tuple[float, float] | None) -> list[dict]:
    torch.manual_seed(0)
    experts, top_k = shape.groups * shape.experts_per_group, shape.top_k_groups * shape.top_k_experts
    nested = NestedMoE(shape.dim, shape.hidden, shape.groups, shape.experts_per_group, shape.top_k_groups,
                       shape.top_k_experts).to(device=device, dtype=dtype)
    flat = TopKMoE(shape.dim, shape.hidden, experts, top_k).to(device=device, dtype=dtype)
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    floor = training_floor_ms(expert_flops(shape.tokens, top_k, shape.dim, shape.hidden, "gelu"), x, nested, rates)
    impls = []
    # On the CPU under TRITON_INTERPRET=1 the Triton rows carry saved bytes only (untimed).
    interpreted = device.type != "cuda" and settings.INTERPRET
    for backend in ("triton", "torch") if device.type == "cuda" or interpreted else ("torch",):
        timed = backend == "torch" or device.type == "cuda"
        impls += [Impl(f"nested {backend}", backend_forward(nested, backend), nested,
                       floor_ms=floor if backend == "triton" else None, timed=timed),
                  Impl(f"flat top-{top_k} {backend}", backend_forward(flat, backend), flat,
                       same_function=False, timed=timed)]
    eager = Impl("eager two-level loop", functools.partial(eager_nested_moe, nested), nested)
    rows = measure_impls(shape.label, impls, x, eager)
    for nested_row, flat_row in zip(rows[0:-1:2], rows[1:-1:2]):
        if nested_row["fwd_bwd_ms"] is not None:
            nested_row["fwd_bwd_vs_flat"] = nested_row["fwd_bwd_ms"] / flat_row["fwd_bwd_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_suite("nested", __doc__.split("\n\n")[0], SHAPES, TARGETS, bench_shape, argv,
                     extra_columns=["fwd_bwd_vs_flat"])


if __name__ == "__main__":
    sys.exit(main())

"""Training-step measurements of token layers, shared by the MoE suites (``moe``, ``nested``).

For a forward function f(x) -> y over tokens x [T, D] with a fixed output gradient dy:

    fwd_ms       f(x) with autograd recording (a training forward)
    bwd_ms       y.backward(dy) alone, on a retained graph
    fwd_bwd_ms   f(x).backward(dy)
    peak_mb      peak device memory of f(x).backward(dy) above what was allocated before it
                 (parameters, inputs and dy; parameter gradients are freed first, so each
                 implementation pays for allocating them)
    saved_bytes_per_token   bytes autograd keeps for backward over T (``memory.saved_bytes``:
                 each storage once, parameters and x excluded), on any device

On a GPU calls rotate through copies of x so that a working set smaller than the L2 cache is not
timed from the cache (``rotation_count``). On the CPU every time is wall time (``cpu_step_times``:
the median step over interleaved rounds and its forward and backward, which add up to it, with
the interquartile ranges as ``*_iqr_ms``), not a kernel speed, and there is no peak-memory counter. A Triton row on the CPU (interpreter) has
saved bytes only, no times.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from moe_restore.kernels.activations import first_layer_width

from .memory import saved_bytes
from .plots import write_plots
from .common import (CPU_ROUNDS, cpu_step_times, environment, floor_ms, format_table, measured_copy_bandwidth,
                     measured_matmul_rate, on_gpu, peak_memory_mb, rotation_count, time_ms, write_results)

CPU_NOTE = (f"No GPU: Triton kernel timings need a GPU. Timing the torch backend and the baselines against the "
            f"eager loop, float32, small shapes: CPU wall time in ms, the median step of {CPU_ROUNDS} interleaved "
            "rounds and its parts (fwd_bwd = fwd + bwd), iqr = interquartile range (not kernel speeds); the Triton "
            "path's saved bytes are counted under the interpreter.")
COLUMNS = ["shape", "implementation", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_iqr_ms", "peak_mb",
           "saved_bytes_per_token", "fwd_bwd_x_vs_eager", "peak_vs_eager", "saved_vs_eager", "rel_err_vs_eager",
           "floor_ms"]


def expert_flops(num_tokens: int, top_k: int, dim: int, hidden: int, activation: str) -> float:
    """Forward FLOPs of the routed expert MLPs: two GEMMs per assignment (swiglu: 2H columns first)."""
    first = first_layer_width(activation, hidden)
    return 2.0 * num_tokens * top_k * (dim * first + hidden * dim)


def measure(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: torch.nn.Module,
            timed: bool = True) -> dict:
    """fwd_ms, bwd_ms, fwd_bwd_ms, peak_mb and saved_bytes_per_token of ``forward`` (see the module
    docstring); untimed: the saved bytes only."""
    row = {"saved_bytes_per_token": saved_bytes(forward, x, module.parameters()) / x.shape[0]}
    if not timed or not on_gpu():  # the CPU's times come from cpu_step_times (measure_impls)
        return {"fwd_ms": None, "bwd_ms": None, "fwd_bwd_ms": None, "peak_mb": None, **row}
    copies = rotation_count([x]) - 1 if on_gpu() else 0
    xs = [x] + [x.detach().clone().requires_grad_() for _ in range(copies)]
    dy = torch.randn_like(forward(x).detach())
    row["fwd_ms"] = time_ms(forward, [(xi,) for xi in xs])
    graphs = [(forward(xi), dy) for xi in xs]
    row["bwd_ms"] = time_ms(lambda y, g: y.backward(g, retain_graph=True), graphs)
    del graphs
    row["fwd_bwd_ms"] = time_ms(lambda xi, g: forward(xi).backward(g), [(xi, dy) for xi in xs])
    module.zero_grad(set_to_none=True)
    x.grad = None
    row["peak_mb"] = peak_memory_mb(lambda: forward(x).backward(dy))
    if on_gpu():
        torch.cuda.empty_cache()  # the eager loop and the torch backend leave large caches behind
    return row


def _run_with_backend(layer: torch.nn.Module, backend: str, x: torch.Tensor) -> torch.Tensor:
    layer.backend = backend
    return layer(x)


def backend_forward(layer: torch.nn.Module, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> layer(x) on ``backend`` (one layer, so every backend uses the same parameters)."""
    return functools.partial(_run_with_backend, layer, backend)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


@dataclass
class Impl:
    """One implementation of a shape's layer: ``forward`` over tokens, the module owning its
    parameters, whether it computes the eager loop's function (so its output error against the
    eager loop means something), its floor in ms (None: not reported) and whether it is timed
    (False: the Triton interpreter on the CPU, saved bytes only)."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    same_function: bool = True
    floor_ms: float | None = None
    timed: bool = True


def measure_impls(label: str, impls: Sequence[Impl], x: torch.Tensor, eager: Impl) -> list[dict]:
    """Rows of ``measure`` for each implementation and the eager loop, with the relative error of
    each forward output against the eager loop's and the speed and memory ratios against it. On the
    CPU the times come from one interleaved run of the timed implementations (``cpu_step_times``)."""
    with torch.no_grad():
        reference = eager.forward(x)
    rows = []
    for impl in [*impls, eager]:
        error = None
        if impl.same_function and impl is not eager:
            with torch.no_grad():
                error = relative_error(impl.forward(x), reference)
        rows.append({"shape": label, "implementation": impl.name, **measure(impl.forward, x, impl.module, impl.timed),
                     "rel_err_vs_eager": error, "floor_ms": impl.floor_ms})
    if not on_gpu():
        timed = [(impl, row) for impl, row in zip([*impls, eager], rows) if impl.timed]
        dy = torch.randn_like(reference)
        steps = [(functools.partial(impl.forward, x), functools.partial(torch.Tensor.backward, gradient=dy))
                 for impl, _ in timed]
        for (_, row), times in zip(timed, cpu_step_times(steps, label=label)):
            row.update(times)
    base = rows[-1]
    for row in rows[:-1]:
        if row["fwd_bwd_ms"] is not None:
            row["fwd_bwd_x_vs_eager"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        if row["peak_mb"] is not None and base["peak_mb"]:
            row["peak_vs_eager"] = row["peak_mb"] / base["peak_mb"]
        if base["saved_bytes_per_token"]:
            row["saved_vs_eager"] = row["saved_bytes_per_token"] / base["saved_bytes_per_token"]
    return rows


def training_floor_ms(flops_fwd: float, x: torch.Tensor, module: torch.nn.Module,
                      rates: tuple[float, float] | None) -> float | None:
    """Forward + backward floor in ms: three times the forward FLOPs (dx and the weight gradients
    each cost about a forward) at the measured matmul rate, or the bytes that must move (x, y, dy
    and dx once; the parameters read twice and their gradients written once) at the copy rate,
    whichever is larger. None without measured rates."""
    if rates is None:
        return None
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    bytes_moved = 4 * x.numel() * x.element_size() + 3 * params
    bandwidth, matmul_rate = rates
    return floor_ms(bytes_moved, 3 * flops_fwd, bandwidth, matmul_rate)


def run_suite(name: str, description: str, shapes: dict[str, Sequence[Any]], targets: str,
              bench_shape: Callable[..., list[dict]], argv: list[str] | None,
              extra_columns: Sequence[str] = (), *, columns: Sequence[str] = COLUMNS, cpu_note: str = CPU_NOTE,
              sweep: Callable[..., list[dict]] | None = None) -> int:
    """Parse ``--quick``, pick device, dtype and shapes, run ``bench_shape(shape, dtype, device,
    rates)`` for each shape, print the table (``columns`` + ``extra_columns``) and write the JSON
    results, then the charts beside them (``plots``). ``sweep(shapes, dtype, device)``, if given,
    adds rows of a sweep (the moe suite's skew sweep) to the results, after the table.

    ``shapes`` has the keys "gpu", "gpu_quick", "cpu" and "cpu_quick"; ``rates`` is (copy bandwidth in B/s,
    matmul rate in FLOP/s) measured on the GPU, None on the CPU.
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args(argv)

    env = environment()
    if on_gpu():
        device, dtype = torch.device("cuda"), torch.bfloat16
        rates = (measured_copy_bandwidth(), measured_matmul_rate(dtype))
        chosen = shapes["gpu_quick"] if args.quick else shapes["gpu"]
        print(f"{env['device']}: copy {rates[0] / 1e9:.0f} GB/s, bf16 matmul {rates[1] / 1e12:.0f} TFLOP/s; "
              f"targets: {targets}")
    else:
        device, dtype, rates = torch.device("cpu"), torch.float32, None
        chosen = shapes["cpu_quick"] if args.quick else shapes["cpu"]
        print(cpu_note)

    rows: list[dict] = []
    for index, shape in enumerate(chosen, start=1):
        print(f"[{index}/{len(chosen)}] {getattr(shape, 'label', shape)} ...", flush=True)
        rows += bench_shape(shape, dtype, device, rates)
    shown = list(columns) + list(extra_columns)
    # Every time on the CPU is a CPU wall time: the header says so.
    headers = {} if on_gpu() else {c: f"CPU {c}" for c in shown if c.endswith("_ms")}
    print(format_table(rows, shown, headers))
    if sweep is not None:
        print("skew sweep ...", flush=True)
        rows += sweep(list(chosen), dtype, device)
    path = write_results(name, rows, {"dtype": str(dtype).replace("torch.", ""), "targets": targets,
                                      "quick": args.quick, "rates": rates})
    print(f"results written to {path}")
    write_plots(path)
    return 0

"""Benchmark of the sigmoid-gated selective scan: Triton kernels vs the "torch" backend
(vectorised chunked PyTorch) vs the sequential loop over tokens (the float64 oracle
``kernels.naive.gated_scan``, float64 whatever the inputs' dtype); at N = 1 also vs
flash-linear-attention's chunked HGRN kernel (``fla-core``), when it imports.

    python -m benchmarks.scan [--quick]          (also: moe-restore bench scan)

Reports forward and backward times, peak memory of forward + backward, and the forward's
achieved bandwidth: bytes of the inputs read once plus the output written once, over time,
against the measured device-to-device copy rate, and the bytes kept for backward per token
(``memory.saved_bytes``; the inputs excluded). Kernel speeds need a GPU: on a CPU the script says
so and times only the torch backend against the loop, at small shapes, as CPU wall time
(``common.cpu_step_times``: medians and spreads of the forward, the backward and the step); under
``TRITON_INTERPRET=1`` it adds the Triton scan's saved bytes (untimed).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from moe_restore.kernels import naive, settings
from moe_restore.kernels.gated_scan import gated_scan

from .common import CPU_ROUNDS, cpu_step_times, on_gpu, peak_memory_mb, time_ms
from .layer_timing import run_suite
from .memory import saved_bytes

GPU_SHAPES = [(8, 16384, 192, 16), (8, 65536, 96, 16)]   # (B, L, D, N), bf16
GPU_QUICK_SHAPES = [(2, 4096, 64, 16)]
CPU_SHAPES = [(2, 512, 32, 8)]
CPU_QUICK_SHAPES = [(1, 128, 16, 4)]
HGRN_STATE = 1
TARGETS = "forward >= 60% of copy bandwidth, >= 20x the torch backend, >= fla HGRN at N=1"


def make_inputs(batch, length, dim, state, dtype, device, with_gates=True):
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()  # noqa: E731
    u, f = rand(batch, length, dim), rand(batch, length, dim)
    bm, cm = rand(batch, length, state), rand(batch, length, state)
    if not with_gates:
        return [u, f, bm, cm], {}
    d_skip = torch.randn(dim, generator=g, device=device).requires_grad_()
    return [u, f, bm, cm], {"d_skip": d_skip, "z": rand(batch, length, dim)}


def measure(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], io_bytes: int,
            copy_rate: float | None, timed: bool = True, label: str = "") -> dict:
    """Saved bytes per token; timed: forward ms, backward ms (the backward pass alone), peak MiB of
    both, forward bandwidth; on the CPU wall times from ``cpu_step_times`` (medians, spreads and
    the step, fwd_bwd_ms = fwd + bwd), without peak memory or bandwidth."""
    saved = {"saved_bytes_per_token": saved_bytes(lambda _: forward(), inputs[0], inputs) / inputs[0].shape[:2].numel()}
    if not timed:
        return {"fwd_ms": None, "bwd_ms": None, "peak_mb": None, **saved}
    if not on_gpu():  # CPU wall time, forward and backward of one step in the same round
        grad = torch.randn_like(forward())
        times = cpu_step_times([(forward, lambda out: torch.autograd.grad(out, inputs, grad))], label=label)[0]
        return {**times, "peak_mb": None, **saved}
    fwd = time_ms(lambda: forward(), [()])
    out = forward()
    grad = torch.randn_like(out)
    bwd = time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), [()])
    del out
    peak = peak_memory_mb(lambda: torch.autograd.grad(forward(), inputs, grad))
    row = {"fwd_ms": fwd, "bwd_ms": bwd, "peak_mb": peak, **saved}
    if copy_rate is not None:
        rate = io_bytes / (fwd * 1e-3)
        row.update(fwd_GBps=rate / 1e9, fwd_frac_of_copy=rate / copy_rate)
    return row


def forward_io_bytes(batch, length, dim, state, dtype, with_gates=True) -> int:
    """u, f (and z) read, Bm and Cm read, out written, each once."""
    per_token = (4 if with_gates else 3) * dim + 2 * state
    return batch * length * per_token * torch.empty((), dtype=dtype).element_size()


def bench_shape(shape, dtype, device, copy_rate, impls) -> list[dict]:
    batch, length, dim, state = shape
    inputs, extra = make_inputs(batch, length, dim, state, dtype, device)
    params = inputs + list(extra.values())
    io_bytes = forward_io_bytes(batch, length, dim, state, dtype)
    rows = []
    for name in impls:
        if name == "loop":
            forward = lambda: naive.gated_scan(*inputs, **extra)[0]  # noqa: E731
        else:
            forward = lambda name=name: gated_scan(*inputs, **extra, backend=name)  # noqa: E731
        timed = name != "triton" or device.type == "cuda"
        label = f"B{batch} L{length} D{dim} N{state}"
        rows.append({"shape": label, "implementation": name,
                     **measure(forward, params, io_bytes, copy_rate, timed, label=f"{label} {name}")})
        if on_gpu():
            torch.cuda.empty_cache()  # the torch backend and the loop leave large caches behind
    by_impl = {r["implementation"]: r for r in rows}
    for row in rows:
        for other in ("torch", "loop"):
            if other in by_impl and row["implementation"] != other and row["fwd_ms"] is not None:
                row[f"fwd_x_vs_{other}"] = by_impl[other]["fwd_ms"] / row["fwd_ms"]
                row[f"bwd_x_vs_{other}"] = by_impl[other]["bwd_ms"] / row["bwd_ms"]
    return rows


def bench_hgrn(shape, dtype, device, copy_rate) -> list[dict]:
    """N = 1, Bm = Cm = 1, no d_skip or z: our scan is HGRN; fla's kernel gets x = (1 - a) u and
    g = log a ready-made (their preparation is not timed)."""
    try:
        from fla.ops.hgrn import chunk_hgrn
    except ImportError as err:
        print(f"fla HGRN comparison unavailable: cannot import fla ({err})")
        return []
    batch, length, dim, _ = shape
    inputs, _ = make_inputs(batch, length, dim, HGRN_STATE, dtype, device, with_gates=False)
    u, f = inputs[0], inputs[1]
    ones = torch.ones(batch, length, HGRN_STATE, device=device, dtype=dtype)
    x = (torch.sigmoid(-f.float()) * u.float()).to(dtype).detach().requires_grad_()
    g = torch.nn.functional.logsigmoid(f.float()).to(dtype).detach().requires_grad_()
    io_bytes = forward_io_bytes(batch, length, dim, HGRN_STATE, dtype, with_gates=False)
    label = f"B{batch} L{length} D{dim} N1 (HGRN)"
    ours = measure(lambda: gated_scan(u, f, ones, ones, backend="triton"), [u, f], io_bytes, copy_rate)
    theirs = measure(lambda: chunk_hgrn(x, g)[0], [x, g], io_bytes, copy_rate)
    ours["fwd_x_vs_fla"] = theirs["fwd_ms"] / ours["fwd_ms"]
    ours["bwd_x_vs_fla"] = theirs["bwd_ms"] / ours["bwd_ms"]
    return [{"shape": label, "implementation": "triton", **ours},
            {"shape": label, "implementation": "fla chunk_hgrn", **theirs}]


COLUMNS = ["shape", "implementation", "fwd_ms", "bwd_ms", "peak_mb", "saved_bytes_per_token", "fwd_x_vs_torch",
           "bwd_x_vs_torch",
           "fwd_x_vs_loop", "fwd_x_vs_fla", "fwd_GBps", "fwd_frac_of_copy"]
CPU_COLUMNS = ["shape", "implementation", "fwd_ms", "fwd_iqr_ms", "bwd_ms", "bwd_iqr_ms", "fwd_bwd_ms",
               "fwd_bwd_iqr_ms", "saved_bytes_per_token", "fwd_x_vs_torch", "bwd_x_vs_torch", "fwd_x_vs_loop"]
CPU_NOTE = (f"No GPU: Triton kernel timings need a GPU. Timing only the torch backend against the sequential loop, "
            f"float32, small shapes: CPU wall time in ms, the median step of {CPU_ROUNDS} rounds and its parts "
            "(fwd_bwd = fwd + bwd), iqr = interquartile range (not kernel speeds).")


def bench_all(shape, dtype, device, rates) -> list[dict]:
    """Our scan (Triton on a GPU), the torch backend and the loop; fla's HGRN beside them on a GPU."""
    if device.type != "cuda":
        interpreted = ("triton",) if settings.INTERPRET else ()
        return bench_shape(shape, dtype, device, None, (*interpreted, "torch", "loop"))
    copy_rate = rates[0]
    return bench_shape(shape, dtype, device, copy_rate, ("triton", "torch", "loop")) + \
        bench_hgrn(shape, dtype, device, copy_rate)


def main(argv: list[str] | None = None) -> int:
    shapes = {"gpu": GPU_SHAPES, "gpu_quick": GPU_QUICK_SHAPES, "cpu": CPU_SHAPES, "cpu_quick": CPU_QUICK_SHAPES}
    return run_suite("scan", __doc__.split("\n\n")[0], shapes, TARGETS, bench_all, argv,
                     columns=COLUMNS if on_gpu() else CPU_COLUMNS, cpu_note=CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

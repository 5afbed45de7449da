"""Shared benchmark harness: timing, peak memory, physical floors, JSON results, tables.

Kernel speeds are GPU measurements only: ``time_ms`` uses ``triton.testing.do_bench`` (median of
repeated runs after warm-up) on CUDA. On a machine without CUDA the suites time training steps
with ``cpu_step_times``: wall time, forward and backward of each step timed in the same round so
that a step is the sum of its parts, medians and interquartile ranges over interleaved rounds,
labelled ``"cpu-wall-rounds"`` in the results and "CPU" in the tables: not kernel speeds.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moe_restore.kernels.settings import results_dir

L2_BYTES_GUESS = 60 * 2**20  # an H100/H200 L2 is 50-60 MB: input sets larger than this need no rotation


def on_gpu() -> bool:
    return torch.cuda.is_available()


def environment() -> dict[str, Any]:
    """Device, library versions and commit, written beside every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name() if on_gpu() else f"cpu ({platform.processor() or platform.machine()})",
        "timing": "do_bench-median" if on_gpu() else "cpu-wall-rounds",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _nbytes(args: Sequence[Any]) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def time_ms(fn: Callable[..., Any], input_sets: Sequence[Sequence[Any]]) -> float:
    """Median time of ``fn(*inputs)`` in milliseconds.

    ``input_sets`` are alternative argument tuples; calls rotate through them so that a working
    set smaller than the L2 cache is not timed from the cache. Pass one set when it is larger.
    """
    cycle = itertools.cycle(input_sets)
    call = lambda: fn(*next(cycle))  # noqa: E731
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    call()  # warm-up
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


CPU_ROUNDS = 15


def cpu_step_times(steps: Sequence[tuple[Callable[[], Any], Callable[[Any], Any]]], *, rounds: int = CPU_ROUNDS,
                   label: str = "") -> list[dict[str, float]]:
    """CPU wall times (ms) of training steps, each a pair (forward, backward): ``forward()`` returns
    what ``backward(out)`` consumes.

    One warm-up round, then ``rounds`` rounds (odd: a median is one of them) that each run every
    step once in turn, so that the steps compared on one line share the moments of a shared
    machine. In a round a step's forward and backward are timed back to back (``perf_counter``).
    Per step: ``fwd_bwd_ms``, the median step time, and ``fwd_ms`` and ``bwd_ms``, the parts of
    that median round, which add up to it exactly (medians of each part taken separately need not,
    when a busy machine stalls one part of some rounds); ``fwd_iqr_ms``, ``bwd_iqr_ms`` and
    ``fwd_bwd_iqr_ms``, the interquartile range of each over the rounds (the spread). A progress
    bar on stderr counts the rounds."""
    if rounds < 1 or rounds % 2 == 0:
        raise ValueError(f"rounds must be odd and positive, got {rounds}")
    from tqdm.auto import tqdm

    samples = [{"fwd": [], "bwd": [], "fwd_bwd": []} for _ in steps]
    with tqdm(total=rounds + 1, desc=f"{label} (CPU wall time, rounds)", unit="round", leave=False) as bar:
        for r in range(rounds + 1):
            for (forward, backward), times in zip(steps, samples):
                start = time.perf_counter()
                out = forward()
                middle = time.perf_counter()
                backward(out)
                end = time.perf_counter()
                if r:  # round 0 warms up
                    for key, seconds in (("fwd", middle - start), ("bwd", end - middle), ("fwd_bwd", end - start)):
                        times[key].append(seconds * 1e3)
            bar.update(1)
    results = []
    for times in samples:
        median_round = sorted(range(rounds), key=times["fwd_bwd"].__getitem__)[rounds // 2]
        row = {f"{key}_ms": values[median_round] for key, values in times.items()}
        for key, values in times.items():
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if rounds > 1 else (0, 0, 0)
            row[f"{key}_iqr_ms"] = q3 - q1
        results.append(row)
    return results


def rotation_count(example_inputs: Sequence[Any]) -> int:
    """How many input sets to rotate through so that together they overflow the L2 cache."""
    size = max(_nbytes(example_inputs), 1)
    return max(1, min(8, -(-2 * L2_BYTES_GUESS // size)))


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before (MiB).
    None on the CPU, where PyTorch keeps no such counter."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measured_copy_bandwidth(num_bytes: int = 2**28, device: str = "cuda") -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()])
    return 2 * src.numel() / (ms * 1e-3)


def measured_matmul_rate(dtype: torch.dtype = torch.bfloat16, n: int = 8192, device: str = "cuda") -> float:
    """Dense matrix-product rate in FLOP/s (n^3, random operands)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, [()])
    return 2 * n**3 / (ms * 1e-3)


def floor_ms(bytes_moved: float, flops: float, bandwidth: float, matmul_rate: float) -> float:
    """The physical floor: the larger of bytes over bandwidth and FLOPs over the matmul rate."""
    return max(bytes_moved / bandwidth, flops / matmul_rate) * 1e3


def write_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write ``rows`` with the environment as JSON under ``results_dir()`` and return the path."""
    env = environment()
    tag = "gpu" if on_gpu() else "cpu"
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = results_dir() / f"{name}-{tag}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, **(extra or {}), "rows": rows}, indent=2) + "\n")
    return path


def format_table(rows: list[dict[str, Any]], columns: Sequence[str], headers: dict[str, str] | None = None) -> str:
    """A Markdown table of ``columns`` of ``rows`` (floats to 3 significant digits); ``headers``
    renames columns in the header line."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join((headers or {}).get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

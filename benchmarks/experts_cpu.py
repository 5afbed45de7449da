"""CPU timing of one transformers experts module under each experts implementation: ours
("moe_restore_torch", the torch backend) against transformers' "grouped_mm" (its default),
"batched_mm" and "eager" (the plain per-expert loop), on the same module, weights and routing.

    python -m moe_restore.benchmarks.experts_cpu [--rounds 15] [--threads 1] [--flush-mib 64] [--json PATH]

The module is Mixtral's experts class (SiLU-gated, [gate | up] rows, the hook's default layout),
float32. For each shape every implementation runs once per round (after one warm-up round), so
that all rows of a shape see the same moments of a shared machine; each call is timed as this
process's CPU time. Every timed call starts from the same state, whichever run came before it:
the order of the runs is shuffled afresh each round (seeded), and before each call a buffer of
``--flush-mib`` MiB (more than the last-level cache) is rewritten, so the weights and the
previous run's tensors are out of the caches for every implementation alike. A fixed order
gave the run after the plain loop's forward + backward a penalty of its own: with the earlier
rotation (each round starting one run later, the implementations in the order listed) the
inference ratio of grouped_mm to ours was 0.85-0.87 at three of the four shapes with ours
listed first and 1.09-1.21 with grouped_mm listed first, the same code.

``fwd``: inference (no autograd); ``fwd+bwd``: a training forward and its backward to the hidden
states and the expert weights; ``bwd``: the backward of those same calls, timed apart (its
``minor_page_faults`` is None: faults are counted per call). Reported: median and interquartile
range (p25-p75) in ms, and each implementation's median over ours. CPU figures: they compare
implementations on this machine, they are not kernel speeds. ``--json PATH`` also writes every
row, every sample, the load average at the start and end and the versions of torch and
transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import time
from typing import Callable

import torch

IMPLEMENTATIONS = ("moe_restore_torch", "grouped_mm", "batched_mm", "eager")
# (tokens T, hidden D, expert width I, experts E, top-k): a decoding step, small and larger prefill.
SHAPES = ((4, 256, 512, 8, 2), (256, 64, 128, 8, 2), (512, 256, 512, 8, 2), (256, 128, 96, 16, 4))


def _experts(D: int, I: int, E: int, seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    import moe_restore  # noqa: F401 - registers "moe_restore_torch"

    config = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E)
    torch.manual_seed(seed)
    experts = MixtralExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return experts


def _call(experts, name: str, x, index, weights, dy: torch.Tensor | None) -> float | None:
    """One inference call (``dy`` None), or a training forward and backward; for the latter the
    backward's own process time in seconds, so that forward and backward can be told apart."""
    experts.config._experts_implementation = name
    if dy is None:
        with torch.no_grad():
            experts(x, index, weights)
        return None
    y = experts(x, index, weights)
    start = time.process_time()
    y.backward(dy)
    return time.process_time() - start


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    p25, p50, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    return p25, p50, p75


def bench_shape(T: int, D: int, I: int, E: int, k: int, rounds: int, flush_mib: int = 64) -> list[dict]:
    """One row per (implementation, pass) of one shape; see the module docstring."""
    experts = _experts(D, I, E)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen).requires_grad_()
    weights, index = torch.randn(T, E, generator=gen).softmax(-1).topk(k, dim=-1)
    dy = torch.randn(T, D, generator=gen)
    outputs = {}
    for name in IMPLEMENTATIONS:  # every implementation computes the same function
        experts.config._experts_implementation = name
        with torch.no_grad():
            outputs[name] = experts(x, index, weights)
    err = {n: ((o - outputs["eager"]).norm() / outputs["eager"].norm()).item() for n, o in outputs.items()}
    runs: dict[tuple[str, str], Callable[[], None]] = {}
    for name in IMPLEMENTATIONS:
        runs[name, "fwd"] = lambda name=name: _call(experts, name, x, index, weights, None)
        runs[name, "fwd+bwd"] = lambda name=name: _call(experts, name, x, index, weights, dy)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    samples.update({(name, "bwd"): [] for name in IMPLEMENTATIONS})  # the backward of each fwd+bwd call
    page_faults: dict[tuple[str, str], list[int]] = {key: [] for key in runs}
    keys = list(runs)
    order = random.Random(T * 1000 + D)  # the same shuffles every run of this shape
    flush = torch.zeros(flush_mib << 18)  # flush_mib MiB of float32
    for r in range(rounds + 1):
        order.shuffle(keys)
        for key in keys:
            # No gradient before any call, as after optimizer.zero_grad(): a backward that found
            # the last run's .grad would add into it (12 MiB at T4) where the first run of the
            # round only stores its own.
            x.grad = None
            experts.zero_grad(set_to_none=True)
            flush.add_(1.0)  # every cache line of the buffer written: the previous run's data evicted
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.process_time()
            backward = runs[key]()
            if r:
                samples[key].append((time.process_time() - start) * 1e3)
                page_faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                if backward is not None:
                    samples[key[0], "bwd"].append(backward * 1e3)
    rows = []
    for (name, what), times in samples.items():
        p25, p50, p75 = _quartiles(times)
        ours = statistics.median(samples["moe_restore_torch", what])
        rows.append(dict(shape=f"T{T} D{D} I{I} E{E} k{k}", implementation=name, what=what, median_ms=p50,
                         p25_ms=p25, p75_ms=p75, vs_ours=p50 / ours, rel_err_vs_eager=err[name], samples_ms=times,
                         minor_page_faults=statistics.median(page_faults[name, what]) if what != "bwd" else None))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flush-mib", type=int, default=64,
                        help="MiB rewritten before every timed call (more than the last-level cache)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and samples to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"CPU figures (process CPU time, {args.rounds} shuffled rounds, {args.threads} thread(s), float32, "
          f"caches flushed before each call; load average {load[0]:.2f}; not kernel speeds)")
    print("| shape | pass | " + " | ".join(IMPLEMENTATIONS) + " |")
    print("|---|---|" + "---|" * len(IMPLEMENTATIONS))
    every_row = []
    for shape in SHAPES:
        rows = bench_shape(*shape, rounds=args.rounds, flush_mib=args.flush_mib)
        every_row += rows
        for what in ("fwd", "fwd+bwd", "bwd"):
            cells = [f"{r['median_ms']:.2f} [{r['p25_ms']:.2f}-{r['p75_ms']:.2f}] ({r['vs_ours']:.2f}x)"
                     for name in IMPLEMENTATIONS for r in rows if r["implementation"] == name and r["what"] == what]
            print(f"| {rows[0]['shape']} | {what} | " + " | ".join(cells) + " |")
        worst = max(r["rel_err_vs_eager"] for r in rows)
        print(f"<!-- {rows[0]['shape']}: largest relative error against eager {worst:.1e} -->")
    if args.json:
        import transformers

        meta = dict(rounds=args.rounds, threads=args.threads, dtype="float32", timer="process CPU time",
                    flush_mib=args.flush_mib, order="shuffled each round (seeded per shape)",
                    loadavg_start=load, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count(),
                    torch=torch.__version__, transformers=transformers.__version__,
                    python=platform.python_version(), machine=platform.machine())
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(meta=meta, rows=every_row), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ahead-of-time compile check of every Triton kernel, for sm_90a and sm_80, with no GPU.

Two stages, each in its own Python process (a kernel is either interpreted or compiled, decided
when ``moe_restore.kernels`` is first imported):

1. record (``TRITON_INTERPRET=1``): the public ops (``topk_route``, ``nested_route``, ``moe_mlp``
   forward and backward on the fused and grouped paths, ``gated_scan`` at N=1..64,
   ``gated_scan_2d``) run at the benchmark widths and at users' shapes (odd widths, every
   activation with and without bias, the E/k of the layers and the transformers families; see
   ``_compile_record``), and every kernel launch is recorded;
2. compile (no interpreter): each distinct launch is compiled with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` at its default
   configuration, or with ``all_configs`` at every configuration its autotuner keeps.

Each build reports the Triton version that compiled it, registers, spill bytes, stack, shared
memory against the per-block limit (227 KiB on sm_90a, 163 KiB on sm_80), what each ``tl.dot``
lowered to (from the TTGIR: wgmma, mma.sync or FMA) and the HGMMA / HMMA instructions of the SASS.
``problems`` lists what makes a build unfit: a compile error, shared memory over the limit, a spill
at any configuration the autotuner keeps (a spilling candidate must be pruned), more than
``REGISTER_MARGIN`` registers at the default configuration (a margin against another Triton or
ptxas, whose register allocation moves by tens of registers between releases), a dot off wgmma on
sm_90a at the default configuration unless it is too small for wgmma.

The compile stage can run in another Python environment (``--python``, e.g. a second venv with
an older Triton that has this package installed with ``pip install -e . --no-deps``): the
launches recorded by this one's interpreter are then compiled by that Triton.

Command line: ``moe-restore compile-check`` or ``python -m moe_restore.kernels.compile_check``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGETS = (90, 80)
REGISTER_MARGIN = 240  # most registers a default build may use (of 255 per thread)


def _stage(stage: str, payload: dict, interpret: bool, python: str | None = None) -> list:
    """Run ``stage`` of this module in a fresh process of ``python`` (default: this interpreter);
    its JSON result."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOE_RESTORE_AUTOTUNE", "MOE_RESTORE_DETERMINISTIC") and not k.startswith("MOE_RESTORE_CONFIG_")}
    env.update(TRITON_INTERPRET="1" if interpret else "0", TRITON_ALWAYS_COMPILE="1",
               TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.json"), Path(tmp, "out.json")
        src.write_text(json.dumps(payload))
        env["TRITON_CACHE_DIR"] = str(Path(tmp, "triton-cache"))
        subprocess.run([python or sys.executable, "-m", "moe_restore.kernels.compile_check", "--stage", stage, str(src), str(dst)],
                       env=env, check=True)
        return json.loads(dst.read_text())


def _build_job(job):
    from ._compile_build import build, kernel_and_configs
    launch, index, capability = job
    config = kernel_and_configs(launch, capability)[1][index]
    return build(launch, config, capability)


def _compile_stage(payload: dict) -> list[dict]:
    import triton

    from ._compile_build import config_label, kernel_and_configs
    jobs, meta = [], []
    for launch in payload["launches"]:
        for capability in payload["targets"]:
            configs = kernel_and_configs(launch, capability)[1]
            for index in range(len(configs) if payload["all_configs"] else 1):
                jobs.append((launch, index, capability))
                config = configs[index]
                meta.append({"triton": triton.__version__, "tuner": launch["tuner"], "cases": launch["cases"],
                             "default": index == 0, "constexprs": launch["kwargs"],
                             "config": config_label(config),
                             "num_warps": config.num_warps if config else launch["kwargs"].get("num_warps", 4)})
    with ProcessPoolExecutor(max_workers=payload["jobs"]) as pool:
        rows = list(pool.map(_build_job, jobs))
    return [{**m, **r} for m, r in zip(meta, rows)]


def _too_small_for_wgmma(dot: dict) -> str | None:
    """Why a dot's widths rule wgmma out (None if they do not). A tile of fewer than 64 rows, or
    fewer than 4 warps, is a configuration's choice, not a reason: those are problems."""
    min_k = 8 if dot["dtype"] == "f32" else 16
    if dot["k"] < min_k or dot["n"] < 8:
        return f"N={dot['n']}, K={dot['k']}: below wgmma's N >= 8, K >= {min_k}"
    return None


def annotate(rows: list[dict]) -> list[dict]:
    """Add to each row ``problems`` (what makes the build unfit) and ``notes`` (dots too small for wgmma)."""
    for row in rows:
        problems, notes = [], []
        if row.get("error"):
            problems.append(f"compile error: {row['error']}")
        else:
            if row["smem"] > row["smem_limit"]:
                problems.append(f"shared memory {row['smem'] / 1024:.1f} KiB > {row['smem_limit'] // 1024} KiB")
            if row["spill"] > 0:
                where = "the default" if row["default"] else "a candidate"
                problems.append(f"spills {row['spill']} bytes at {where} configuration")
            if row["default"] and row["regs"] > REGISTER_MARGIN:
                problems.append(f"registers {row['regs']} > {REGISTER_MARGIN} at the default configuration")
            if row["default"] and row["target"] == "sm_90a":
                for dot in row["dots"]:
                    if dot["kind"] == "wgmma":
                        continue
                    why = _too_small_for_wgmma(dot)
                    shape = f"{dot['m']}x{dot['n']}x{dot['k']} {dot['dtype']}"
                    if why is None:
                        problems.append(f"dot {shape} on {dot['kind']}, not wgmma "
                                        f"({row['num_warps']} warps; wgmma needs 64 rows per warp group)")
                    else:
                        notes.append(f"dot {shape} on {dot['kind']}: {why}")
        row["problems"], row["notes"] = problems, notes
    return rows


def run_compile_check(targets=TARGETS, all_configs: bool = False, cases: list[str] | None = None,
                      dtypes: list[str] | None = None, kernels: list[str] | None = None,
                      jobs: int | None = None, python: str | None = None) -> list[dict]:
    """Record and compile (see the module docstring); one annotated row per build.

    ``cases`` (names of ``_compile_record.all_cases``), ``dtypes`` (bf16, fp16, fp32) and
    ``kernels`` (kernel function names) restrict the check; None means all. ``python``: the
    interpreter of the compile stage (another venv's, for its Triton); None: this one.
    """
    from ._compile_record import DTYPES, all_cases
    known = all_cases()
    cases = list(known) if cases is None else list(cases)
    dtypes = list(DTYPES) if dtypes is None else list(dtypes)
    for name in cases:
        if name not in known:
            raise ValueError(f"unknown case {name!r}; known: {', '.join(known)}")
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"targets must be among {TARGETS}, got {target!r}")
    launches = _stage("record", {"cases": cases, "dtypes": dtypes}, interpret=True)
    if kernels is not None:
        launches = [launch for launch in launches if launch["kernel"] in kernels]
        missing = set(kernels) - {launch["kernel"] for launch in launches}
        if missing:
            raise ValueError(f"kernels {sorted(missing)} are not launched by the cases {cases}")
    jobs = jobs or max(1, min(4, (os.cpu_count() or 2) - 1))
    rows = _stage("compile", {"launches": launches, "targets": list(targets), "all_configs": all_configs,
                              "jobs": jobs}, interpret=False, python=python)
    return annotate(rows)


def format_table(rows: list[dict]) -> str:
    """A markdown table: one line per build."""
    lines = ["| kernel | cases | target | config | regs | spill B | stack B | smem KiB (limit) | dots | SASS HGMMA/HMMA | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cases = ", ".join(r["cases"][:3]) + (f" +{len(r['cases']) - 3}" if len(r["cases"]) > 3 else "")
        config = r["config"] + (" (default)" if r["default"] else "")
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {cases} | {r['target']} | {config} | | | | | | | {'; '.join(r['problems'])} |")
            continue
        kinds = {}
        for dot in r["dots"]:
            kinds[dot["kind"]] = kinds.get(dot["kind"], 0) + 1
        dots = " ".join(f"{n} {k}" for k, n in kinds.items()) or "-"
        lines.append(f"| {r['kernel']} | {cases} | {r['target']} | {config} | {r['regs']} | {r['spill']} | {r['stack']} "
                     f"| {r['smem'] / 1024:.1f} ({r['smem_limit'] // 1024}) | {dots} | {r['sass']['HGMMA']}/{r['sass']['HMMA']} "
                     f"| {'; '.join(r['problems'] + r['notes']) or '-'} |")
    return "\n".join(lines)


def kernel_table(rows: list[dict], defaults_only: bool) -> str:
    """A markdown table: one line per (Triton version, kernel, target) over ``rows`` (only the
    default builds with ``defaults_only``): builds, configurations per launch, register range,
    largest spill and shared memory, dot kinds, SASS tensor-core instructions, builds with problems."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["default"] or not defaults_only:
            groups.setdefault((r.get("triton", "?"), r["kernel"], r["target"]), []).append(r)
    lines = ["| Triton | kernel | target | builds | configs | regs | max spill B | max smem KiB (limit) | dots "
             "| SASS HGMMA/HMMA (max) | problems |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (version, kernel, target), group in sorted(groups.items()):
        ok = [r for r in group if not r.get("error")]
        configs = max(sum(1 for q in group if q["cases"] == r["cases"] and q["constexprs"] == r["constexprs"])
                      for r in group)
        kinds: dict[str, int] = {}
        for r in ok:
            for dot in r["dots"]:
                kinds[dot["kind"]] = kinds.get(dot["kind"], 0) + 1
        if ok:
            regs = f"{min(r['regs'] for r in ok)}-{max(r['regs'] for r in ok)}"
            spill, smem = max(r["spill"] for r in ok), max(r["smem"] for r in ok) / 1024
            sass = f"{max(r['sass']['HGMMA'] for r in ok)}/{max(r['sass']['HMMA'] for r in ok)}"
            limit = ok[0]["smem_limit"] // 1024
        else:
            regs, spill, smem, sass, limit = "-", "-", 0.0, "-", "-"
        dots = " ".join(f"{k} {n}" for k, n in kinds.items()) or "-"
        lines.append(f"| {version} | {kernel} | {target} | {len(group)} | {configs} | {regs} | {spill} "
                     f"| {smem:.1f} ({limit}) | {dots} | {sass} | {sum(bool(r['problems']) for r in group)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line: builds, compile errors, spills, over shared memory, over the register margin, problems."""
    builds = len(rows)
    errors = sum(bool(r.get("error")) for r in rows)
    ok = [r for r in rows if not r.get("error")]
    spills = sum(r["spill"] > 0 for r in ok)
    smem = sum(r["smem"] > r["smem_limit"] for r in ok)
    regs = sum(r["default"] and r["regs"] > REGISTER_MARGIN for r in ok)
    bad = sum(bool(r["problems"]) for r in rows)
    versions = ", ".join(sorted({r.get("triton", "?") for r in rows}))
    return (f"Triton {versions}: {builds} builds: {errors} compile errors, {spills} spill, {smem} over the "
            f"shared-memory limit, {regs} defaults over {REGISTER_MARGIN} registers; {bad} with problems")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-restore compile-check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (90, 80)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune configuration, not only the default")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16, fp32 (default: all)")
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes")
    parser.add_argument("--json", default=None, help="write every row to this JSON file")
    parser.add_argument("--python", default=None,
                        help="Python interpreter of the compile stage (another venv's, for its Triton)")
    parser.add_argument("--tables", default=None, metavar="JSON[,JSON...]",
                        help="compile nothing: print the per-kernel tables (defaults, every configuration) "
                             "of these --json results")


def run_from_args(args: argparse.Namespace) -> int:
    split = lambda text: None if text is None else [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    if args.tables:
        rows = [row for name in split(args.tables) for row in json.loads(Path(name).read_text())]
        print("Defaults:\n\n" + kernel_table(rows, defaults_only=True))
        print("\nEvery configuration:\n\n" + kernel_table(rows, defaults_only=False))
        print("\n" + summary([r for r in rows if r["default"]]) + " (defaults)\n" + summary(rows))
        return 0
    rows = run_compile_check(targets=[int(t) for t in split(args.targets)], all_configs=args.all_configs,
                             cases=split(args.cases), dtypes=split(args.dtypes), kernels=split(args.kernels),
                             jobs=args.jobs, python=args.python)
    print(format_table(rows))
    print(summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["problems"] for r in rows) else 0


def _stage_main(stage: str, src: str, dst: str) -> None:
    payload = json.loads(Path(src).read_text())
    if stage == "record":
        from ._compile_record import record
        result = record(payload["cases"], payload["dtypes"])
    else:
        result = _compile_stage(payload)
    Path(dst).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--stage":
        _stage_main(*sys.argv[2:])
    else:
        sys.exit(main())

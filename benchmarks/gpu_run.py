"""One call on a GPU does everything: the kernel tests compiled, the device's copy and bf16
matmul rates, and the moe, nested and scan suites at full shapes, written as JSON and Markdown.

    python -m moe_restore.benchmarks.gpu_run --out DIR            (one H100/H200: under 8 minutes)
    python -m moe_restore.benchmarks.gpu_run --out DIR --dry-run  (the same steps on the CPU, tiny)

Steps, each timed and recorded even when one fails:

1. ``pytest`` on the kernel test files in a subprocess with ``TRITON_INTERPRET=0``: on a GPU the
   kernels are compiled, so the tests check real bf16/fp16 dots and the compiled memory accesses
   (the interpreter's are sequential). Counts come from pytest's JUnit XML.
2. The copy rate (bytes read plus written by a 256 MiB device-to-device copy over its time) and
   the bf16 matmul rate (8192^3), both the ``triton.testing.do_bench`` median.
3. The ``moe``, ``nested`` and ``scan`` suites (``python -m moe_restore.benchmarks.<suite>``), each
   against its baselines (the eager loops, and whatever the suites compare with where importable:
   ``torch._grouped_mm``, ScatterMoE, fla's HGRN); their JSON results are gathered into one file.

Output under DIR: ``gpu_run.json`` (environment: device, torch and Triton versions, commit; dtype,
rates, test counts, each suite's rows with its shapes) and ``gpu_run.md`` (the same as tables),
plus each suite's own JSON under DIR/suites and the tests' XML. The exit status is non-zero when
a test failed or a step raised.

``--dry-run`` runs the same code on the CPU (hiding any GPU): a few kernel tests under the Triton interpreter,
the rates at tiny sizes, and each suite with ``--quick`` (its CPU shapes, torch backend). Its
times are CPU wall times of the code paths, not kernel speeds, and the outputs say so.

Offline GPU machines: ``--build-carry DIR`` (on a machine with network, in a source checkout) writes
under DIR/wheels the project's wheel and, for CPython 3.12 manylinux x86_64, the wheels of its
requirements other than torch and Triton (the GPU machine's own CUDA builds) and of the test-only
packages the run needs (the ``gpu-run`` extra: pytest, hypothesis, pytest-benchmark), pinned by
.ci/constraints-newest.txt. There, ``pip install --no-index --find-links DIR/wheels
"moe-restore[gpu-run]"`` installs them, and this module runs from the installed wheel: the kernel
test files are installed with it (``moe_restore.benchmarks.kernel_tests``). A missing piece (a test
package, the test files) stops the run before any step, with a non-zero exit naming it.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import torch

from .common import environment, format_table, measured_copy_bandwidth, measured_matmul_rate, on_gpu

SUITES = ("moe", "nested", "scan")
KERNEL_TESTS = ("ops/test_routing.py", "ops/test_nested_routing.py", "ops/test_moe_mlp.py", "ops/test_gated_scan.py",
                "properties/test_device_checks.py", "properties/test_sync_free.py")
DRY_RUN_TESTS = "empty or no_tokens"  # a few fast tests per file: the dry run checks the plumbing
TEST_SUPPORT = ("conftest.py", "utils.py")
_HERE = Path(__file__).resolve().parent
SOURCE_ROOT = _HERE.parent  # the checkout's root when this file is benchmarks/gpu_run.py there
# Where the kernel tests are: a source checkout's tests/, else the copy installed with the wheel.
TESTS_DIRS = (SOURCE_ROOT / "tests", _HERE / "kernel_tests")
# The test-only packages the kernel tests need (module -> distribution): the ``gpu-run`` extra.
TEST_PACKAGES = {"pytest": "pytest", "hypothesis": "hypothesis", "pytest_benchmark": "pytest-benchmark"}
CARRY_PYTHON, CARRY_ABI = "3.12", "cp312"
CARRY_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GPU_OWN = ("torch", "triton")  # never carried: the GPU machine's CUDA builds stay as they are
OPTIONAL_BASELINES = {"ScatterMoE": "scattermoe", "fla HGRN": "fla"}
DRY_RUN_NOTE = ("CPU dry run: every step ran at tiny shapes on the CPU (kernel tests under the Triton "
                "interpreter, suites on the torch backend); times are CPU wall times, not kernel speeds.")


def kernel_tests_dir() -> Path | None:
    """The first of ``TESTS_DIRS`` holding every kernel test file and its helpers, else None."""
    for folder in TESTS_DIRS:
        if all((folder / name).is_file() for name in KERNEL_TESTS + TEST_SUPPORT):
            return folder
    return None


def missing_pieces(with_tests: bool) -> list[str]:
    """What the run needs and cannot find here, each named with how to get it."""
    if not with_tests:
        return []
    missing = [f"the Python package {dist!r} (import {module})" for module, dist in TEST_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if kernel_tests_dir() is None:
        missing.append(f"the kernel test files {', '.join(KERNEL_TESTS + TEST_SUPPORT)} (looked in "
                       f"{' and '.join(map(str, TESTS_DIRS))})")
    return missing


def run_kernel_tests(out: Path, dry_run: bool, timeout_s: float) -> dict[str, Any]:
    """pytest on the kernel test files in a subprocess (see the module docstring)."""
    tests_dir = kernel_tests_dir()
    if tests_dir is None:
        raise FileNotFoundError(missing_pieces(True)[-1])
    files = [tests_dir / name for name in KERNEL_TESTS]
    xml = out / "kernel-tests.xml"
    # The options pytest.ini gives in a checkout, given here for the installed copy (which has none).
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", f"--junitxml={xml}",
               *map(str, files)] + (["-k", DRY_RUN_TESTS] if dry_run else [])
    env = {**os.environ, "TRITON_INTERPRET": "1" if dry_run else "0"}
    start = time.perf_counter()
    try:
        # cwd: the tests' folder, never a checkout's root, where `-m` would make the top-level
        # kernels/ importable as `kernels` (the name of the package transformers imports).
        done = subprocess.run(command, cwd=tests_dir, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        output, returncode, status = (expired.stdout or b""), None, "timed out"
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    else:
        output, returncode, status = done.stdout + done.stderr, done.returncode, None
    result: dict[str, Any] = {"command": " ".join(command[1:]), "TRITON_INTERPRET": env["TRITON_INTERPRET"],
                              "returncode": returncode, "wall_s": time.perf_counter() - start,
                              "tail": output[-4000:]}
    (out / "kernel-tests.log").write_text(output)
    if xml.exists():
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        result.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    # A run where nothing passed (every test skipped or deselected) tested nothing: a failure.
    result["status"] = status or ("passed" if returncode == 0 and result.get("passed", 0) > 0 else "failed")
    return result


def measure_rates(dry_run: bool) -> dict[str, Any]:
    """Copy rate (B/s) and bf16 matmul rate (FLOP/s) of this device; tiny sizes on a dry run."""
    device = "cpu" if dry_run else "cuda"
    sizes = (2**20, 64) if dry_run else (2**28, 8192)
    return {"device": device, "copy_bytes": sizes[0], "matmul_n": sizes[1],
            "copy_Bps": measured_copy_bandwidth(sizes[0], device),
            "bf16_matmul_flops": measured_matmul_rate(torch.bfloat16, sizes[1], device)}


def run_suite(name: str, out: Path, dry_run: bool) -> dict[str, Any]:
    """One benchmark suite through its ``main``, its JSON result written under ``out``/suites."""
    suite_dir = out / "suites"
    suite_dir.mkdir(parents=True, exist_ok=True)
    before = set(suite_dir.glob(f"{name}-*.json"))
    previous = os.environ.get("MOE_RESTORE_RESULTS_DIR")
    os.environ["MOE_RESTORE_RESULTS_DIR"] = str(suite_dir)
    start = time.perf_counter()
    record: dict[str, Any] = {}
    try:
        suite = importlib.import_module(f"moe_restore.benchmarks.{name}")
        record["returncode"] = suite.main(["--quick"] if dry_run else [])
    except Exception as error:  # noqa: BLE001 - record the failure, run the other suites
        record["error"] = f"{type(error).__name__}: {error}"
    finally:
        if previous is None:
            os.environ.pop("MOE_RESTORE_RESULTS_DIR", None)
        else:
            os.environ["MOE_RESTORE_RESULTS_DIR"] = previous
    record["wall_s"] = time.perf_counter() - start
    written = sorted(set(suite_dir.glob(f"{name}-*.json")) - before)
    if written:
        record["json"] = str(written[-1])
        record["result"] = json.loads(written[-1].read_text())
    elif "error" not in record:
        record["error"] = "the suite wrote no result file"
    return record


def baselines() -> dict[str, bool]:
    """Which optional baselines can run here (their sources on PYTHONPATH, or installed)."""
    found = {label: importlib.util.find_spec(module) is not None for label, module in OPTIONAL_BASELINES.items()}
    return {"torch._grouped_mm": hasattr(torch, "_grouped_mm"), **found}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, rates, tests, one table per suite."""
    env, rates, tests = report["environment"], report["rates"], report["kernel_tests"]
    lines = [f"# GPU run{' (dry run)' if report['dry_run'] else ''}", ""]
    if report["dry_run"]:
        lines += [DRY_RUN_NOTE, ""]
    lines += [f"device {env['device']}, dtype {report['dtype']}, torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']}, {env['date']}; total {report['wall_s']:.0f} s", ""]
    if "error" in rates:
        lines += [f"rates: {rates['error']}", ""]
    else:
        lines += [f"copy rate {rates['copy_Bps'] / 1e9:.3g} GB/s ({rates['copy_bytes']} B copied), bf16 matmul "
                  f"{rates['bf16_matmul_flops'] / 1e12:.3g} TFLOP/s (n = {rates['matmul_n']})", ""]
    counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if k in tests)
    lines += [f"kernel tests (TRITON_INTERPRET={tests.get('TRITON_INTERPRET', '-')}): {tests['status']}"
              f"{'; ' + counts if counts else ''}{'; ' + tests['why'] if 'why' in tests else ''}", ""]
    lines += ["baselines available: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in
                                                  report["baselines"].items()), ""]
    for name, suite in report["suites"].items():
        lines += [f"## {name} ({suite['wall_s']:.0f} s)", ""]
        if "error" in suite:
            lines += [f"failed: {suite['error']}", ""]
        if "result" in suite:
            rows = suite["result"]["rows"]
            lines += [format_table(rows, _columns(rows)), ""]
    return "\n".join(lines)


def _carried_requirements(wheel: Path) -> list[str]:
    """The requirements of the project's ``wheel`` that the carry holds: the base ones and the
    ``gpu-run`` extra's, less ``GPU_OWN``, as written in its metadata."""
    from email.parser import Parser
    from zipfile import ZipFile

    from packaging.requirements import Requirement

    with ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    kept = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        wanted = marker is None or "extra" not in str(marker) or marker.evaluate({"extra": "gpu-run"})
        if wanted and requirement.name not in GPU_OWN:
            requirement.marker = None  # evaluated for the GPU machine (Linux) by pip download's target
            kept.append(str(requirement))
    return kept


def build_carry(dest: Path) -> int:
    """Write under ``dest``/wheels what an offline GPU machine needs (see the module docstring).
    Needs a source checkout and network; every step's failure exits non-zero."""
    constraints = SOURCE_ROOT / ".ci" / "constraints-newest.txt"
    if not (SOURCE_ROOT / "setup.py").is_file() or not constraints.is_file():
        print(f"--build-carry needs a source checkout (setup.py and {constraints.relative_to(SOURCE_ROOT)} "
              f"under {SOURCE_ROOT})", file=sys.stderr)
        return 2
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(wheels), str(SOURCE_ROOT)], check=True)
    project = max(wheels.glob("moe_restore-*.whl"), key=lambda p: p.stat().st_mtime)
    target = ["--only-binary=:all:", "--python-version", CARRY_PYTHON, "--implementation", "cp",
              "--abi", CARRY_ABI, "--abi", "abi3", "--abi", "none"]
    for platform_tag in CARRY_PLATFORMS:
        target += ["--platform", platform_tag]
    subprocess.run(pip + ["download", "-q", "-d", str(wheels), "-c", str(constraints), *target,
                          *_carried_requirements(project)], check=True)
    print(f"carry written: {wheels} ({len(list(wheels.glob('*.whl')))} wheels). Copy {dest} to the GPU machine "
          f"(Python {CARRY_PYTHON}, its own torch and Triton); there, in the copy, with no network:\n"
          f'  pip install --no-index --find-links {wheels.name} "moe-restore[gpu-run]"\n'
          "  python -m moe_restore.benchmarks.gpu_run --out OUT")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_restore.benchmarks.gpu_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-carry", type=Path, metavar="DIR",
                        help="write the wheels an offline GPU machine needs under DIR/wheels, and stop")
    parser.add_argument("--out", type=Path, help="folder for gpu_run.json, gpu_run.md and logs")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny shapes")
    parser.add_argument("--suites", nargs="*", default=list(SUITES), choices=SUITES, help="suites to run")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests")
    parser.add_argument("--tests-timeout", type=float, default=300.0, help="seconds for the kernel tests")
    args = parser.parse_args(argv)
    if args.build_carry is not None:
        return build_carry(args.build_carry)
    if args.out is None:
        parser.error("--out is required (or --build-carry DIR)")
    missing = missing_pieces(with_tests=not args.skip_tests)
    if missing:
        print("gpu_run cannot run: missing " + "; ".join(missing) + ". Install them (offline: build the carry "
              "with --build-carry on a machine with network, see the module docstring), or pass --skip-tests.",
              file=sys.stderr)
        return 2
    if args.dry_run and on_gpu():
        # Every step decides CPU or GPU by whether CUDA is visible: hide it, in a fresh process.
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        command = [sys.executable, "-m", "moe_restore.benchmarks.gpu_run", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=env).returncode
    if not args.dry_run and not on_gpu():
        parser.error("no CUDA device here: run on a GPU, or pass --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(), "dry_run": args.dry_run,
                              "dtype": "float32" if args.dry_run else "bfloat16", "baselines": baselines()}
    report["kernel_tests"] = ({"status": "skipped", "why": "--skip-tests"} if args.skip_tests
                              else run_kernel_tests(args.out, args.dry_run, args.tests_timeout))
    print(f"kernel tests: {report['kernel_tests']['status']}")
    try:
        report["rates"] = measure_rates(args.dry_run)
    except Exception as error:  # noqa: BLE001 - record it, go on with the suites
        report["rates"] = {"error": f"{type(error).__name__}: {error}"}
    report["suites"] = {name: run_suite(name, args.out, args.dry_run) for name in args.suites}
    report["wall_s"] = time.perf_counter() - start
    (args.out / "gpu_run.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_run.md").write_text(markdown(report) + "\n")
    print(f"written: {args.out / 'gpu_run.json'}, {args.out / 'gpu_run.md'} ({report['wall_s']:.0f} s)")
    failed = (report["kernel_tests"]["status"] not in ("passed", "skipped")
              or "error" in report["rates"]
              or any("error" in s or s.get("returncode") not in (0, None) for s in report["suites"].values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

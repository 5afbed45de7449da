"""The one-call GPU script: its dry run (every step — kernel tests under the interpreter, rates,
the three suites — on the CPU at tiny shapes) from the project installed as a wheel, as on an
offline GPU machine; the carry it builds for such a machine; and its refusal to run, by name,
when a piece is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from zipfile import ZipFile

import pytest

from moe_restore.benchmarks import gpu_run

SUITE_BASELINES = {"moe": "eager loop", "nested": "eager two-level loop", "scan": "loop"}


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    """``--build-carry`` into a fresh folder (builds the project's wheel, downloads the test wheels)."""
    dest = tmp_path_factory.mktemp("carry")
    done = subprocess.run([sys.executable, "-m", "moe_restore.benchmarks.gpu_run", "--build-carry", str(dest)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--no-index --find-links wheels" in done.stdout
    return dest / "wheels"


def test_carry_holds_the_wheel_and_the_test_packages_for_python_3_12(carry):
    wheels = sorted(p.name for p in carry.glob("*.whl"))
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"moe_restore", "pytest", "hypothesis", "pytest_benchmark", "pluggy", "einops"} <= names, wheels
    assert not names & {"torch", "triton"}, "the GPU machine's own torch and Triton are never carried"
    for wheel in wheels:  # installable on CPython 3.12, manylinux x86_64
        python, abi, platform = wheel[:-4].split("-")[-3:]
        assert python in ("py3", "py2.py3", "cp312") or python.startswith("cp3") and abi == "abi3", wheel
        assert platform == "any" or "manylinux" in platform and platform.endswith("x86_64"), wheel
    project = next(carry.glob("moe_restore-*.whl"))
    with ZipFile(project) as archive:
        files = set(archive.namelist())
    assert {f"moe_restore/benchmarks/kernel_tests/{name}" for name in gpu_run.KERNEL_TESTS + gpu_run.TEST_SUPPORT} <= files
    assert not any(f.startswith("kernels/") for f in files)


def test_dry_run_from_the_installed_wheel_writes_every_step(carry, tmp_path):
    """The project installed from its wheel (no source checkout on the path) runs every step."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(next(carry.glob("moe_restore-*.whl")))], check=True, timeout=300)
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-m", "moe_restore.benchmarks.gpu_run", "--out", str(out), "--dry-run"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_run.json").read_text())
    assert report["dry_run"] is True
    assert {"device", "torch", "triton", "commit"} <= set(report["environment"])
    tests = report["kernel_tests"]
    assert tests["status"] == "passed" and tests["TRITON_INTERPRET"] == "1"
    assert str(site / "moe_restore" / "benchmarks" / "kernel_tests") in tests["command"]
    assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0
    assert report["rates"]["copy_Bps"] > 0 and report["rates"]["bf16_matmul_flops"] > 0
    assert set(report["suites"]) == set(SUITE_BASELINES)
    for name, baseline in SUITE_BASELINES.items():
        suite = report["suites"][name]
        assert suite["returncode"] == 0 and "error" not in suite, suite
        rows = suite["result"]["rows"]
        assert {row["implementation"] for row in rows} >= {baseline}
        # On the CPU the Triton rows carry saved bytes only: interpreter times are no kernel speeds.
        assert all(row["fwd_ms"] is None if row["implementation"].split()[-1] == "triton" else row["fwd_ms"] > 0
                   for row in rows), rows
        assert all(row["shape"] for row in rows) and suite["result"]["dtype"] == "float32"
    table = (out / "gpu_run.md").read_text()
    assert "not kernel speeds" in table and "| eager loop |" in table and "## scan" in table


def test_a_missing_test_package_stops_the_run_by_name(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # find_spec reports it absent
    assert gpu_run.main(["--out", str(tmp_path), "--dry-run"]) == 2
    assert "missing the Python package 'hypothesis'" in capsys.readouterr().err
    assert not (tmp_path / "gpu_run.json").exists()


def test_missing_kernel_test_files_stop_the_run_by_name(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_run, "TESTS_DIRS", (tmp_path / "nowhere",))
    assert gpu_run.main(["--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the kernel test files" in err and "test_routing.py" in err and "nowhere" in err
    # Without the tests the run goes on only when asked to.
    assert gpu_run.missing_pieces(with_tests=False) == []

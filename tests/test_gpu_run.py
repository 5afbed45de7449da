"""The one-call GPU script's dry run: every step (kernel tests under the interpreter, rates,
the three suites) runs on the CPU at tiny shapes and writes its JSON and Markdown report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SUITE_BASELINES = {"moe": "eager loop", "nested": "eager two-level loop", "scan": "loop"}


def test_dry_run_writes_every_step(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "moe_restore.benchmarks.gpu_run", "--out", str(tmp_path),
                           "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert report["dry_run"] is True
    assert {"device", "torch", "triton", "commit"} <= set(report["environment"])
    tests = report["kernel_tests"]
    assert tests["status"] == "passed" and tests["TRITON_INTERPRET"] == "1"
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
    table = (tmp_path / "gpu_run.md").read_text()
    assert "not kernel speeds" in table and "| eager loop |" in table and "## scan" in table

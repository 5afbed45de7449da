"""pytest-benchmark tests of the MoE ops and layers (tiny shapes, torch backend), a smoke test
of ``moe-restore bench moe nested --quick``, the saved-bytes count on a hand-checked graph, the
charts and the Triton path's saved bytes against the eager loop's.

CI runs pytest with --benchmark-disable, so each benchmarked call runs once; its result is then
checked against the eager loop of ``benchmarks.eager_moe`` (the benchmarks' baseline), which is
itself a plain loop over experts. Timings here are CPU wall times, not kernel speeds.
"""
from __future__ import annotations

import json

import pytest
import torch

from moe_restore.benchmarks.eager_moe import eager_nested_moe, eager_topk_moe
from moe_restore.benchmarks.memory import saved_bytes
from moe_restore.benchmarks.moe import MoEShape, triton_saved_bytes_per_token
from moe_restore.cli import main as cli_main
from moe_restore.kernels import moe_mlp, nested_route, topk_route
from moe_restore.layers import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE
from utils import DEVICE, assert_close, backends

T, D, H = 96, 24, 40


def tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(DEVICE).requires_grad_()


def test_bench_topk_route(benchmark):
    logits = torch.randn(T, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    routing = benchmark(topk_route, logits, 2, backend="torch")
    assert torch.equal(routing.experts, logits.topk(2, dim=-1).indices)
    assert_close(routing.weights.sum(dim=-1), torch.ones(T), torch.float32, what="weights sum")


def test_bench_nested_route(benchmark):
    g = torch.Generator().manual_seed(2)
    group_logits = torch.randn(T, 5, generator=g).to(DEVICE)
    expert_logits = torch.randn(T, 5, 4, generator=g).to(DEVICE)
    routing = benchmark(nested_route, group_logits, expert_logits, 2, 2, backend="torch")
    assert torch.equal(routing.groups, group_logits.topk(2, dim=-1).indices)
    assert_close(routing.weights.sum(dim=-1), torch.ones(T), torch.float32, what="weights sum")


def test_bench_moe_mlp_forward(benchmark):
    torch.manual_seed(3)
    layer = TopKMoE(D, H, 8, 2, backend="torch").to(DEVICE)
    x = tokens(4).detach()
    routing = topk_route(layer.router.logits(x), 2, backend="torch")
    bank = layer.experts
    y = benchmark(moe_mlp, x, routing, bank.w1, bank.w2, bank.b1, bank.b2, backend="torch")
    assert_close(y, eager_topk_moe(layer, x), torch.float32, what="moe_mlp vs eager loop")


def training_step(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    return y


def test_bench_topk_moe_training_step(benchmark):
    torch.manual_seed(5)
    layer = TopKMoE(D, H, 8, 2, activation="swiglu", backend="torch").to(DEVICE)
    x = tokens(6)
    y = benchmark(training_step, layer, x)
    assert_close(y, eager_topk_moe(layer, x), torch.float32, what="TopKMoE vs eager loop")
    assert layer.router.weight.grad is not None and layer.experts.w1.grad.abs().sum() > 0


def test_bench_nested_moe_training_step(benchmark):
    torch.manual_seed(7)
    layer = NestedMoE(D, H, 5, 4, 2, 2, backend="torch").to(DEVICE)
    x = tokens(8)
    y = benchmark(training_step, layer, x)
    assert_close(y, eager_nested_moe(layer, x), torch.float32, what="NestedMoE vs eager two-level loop")
    router = layer.router
    assert router.group_router.weight.grad.abs().sum() > 0 and router.expert_router.weight.grad.abs().sum() > 0


def test_bench_command_quick_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RESTORE_RESULTS_DIR", str(tmp_path))
    assert cli_main(["bench", "moe", "nested", "--quick"]) == 0
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "Triton kernel timings need a GPU" in printed and "CPU wall time" in printed
        assert "[1/2] " in printed and "| CPU fwd_ms | CPU bwd_ms | CPU fwd_bwd_ms |" in printed  # progress, labels
    for suite, eager in (("moe", "eager loop"), ("nested", "eager two-level loop")):
        (path,) = tmp_path.glob(f"{suite}-*.json")
        result = json.loads(path.read_text())
        assert {"device", "torch", "triton", "commit"} <= set(result["environment"])
        rows = result["rows"]
        impls = {row["implementation"] for row in rows}
        assert eager in impls and any(i.startswith(("torch", "nested torch")) for i in impls)
        for row in rows:
            assert row["shape"] and row["saved_bytes_per_token"] > 0, row
            if "triton" in row["implementation"] and not torch.cuda.is_available():
                assert row["fwd_bwd_ms"] is None  # the interpreter is not timed
                continue
            assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
            if not torch.cuda.is_available():  # the parts of the median round add up to its step
                assert row["fwd_ms"] + row["bwd_ms"] == pytest.approx(row["fwd_bwd_ms"], rel=1e-9), row
                assert min(row["fwd_iqr_ms"], row["bwd_iqr_ms"], row["fwd_bwd_iqr_ms"]) >= 0, row
            if row["rel_err_vs_eager"] is not None:
                assert row["rel_err_vs_eager"] < (3e-2 if torch.cuda.is_available() else 1e-5), row
        assert {path.with_name(f"{path.stem}-{chart}.png").is_file() for chart in ("speed", "saved")} == {True}
    moe_rows = json.loads(next(tmp_path.glob("moe-*.json")).read_text())["rows"]
    by_shape: dict[str, dict[str, dict]] = {}
    for row in moe_rows:
        by_shape.setdefault(row["shape"], {})[row["implementation"]] = row
    for shape, rows in by_shape.items():
        wanted = {"torch", "eager loop", "grouped_mm"} | ({"triton"} if "skew" not in rows["torch"] else set())
        assert wanted <= set(rows), (shape, set(rows))
        if "triton" in rows:
            assert rows["triton"]["saved_bytes_per_token"] <= 0.1 * rows["eager loop"]["saved_bytes_per_token"]
    assert any("skew" in row for row in moe_rows)


def test_cpu_step_times_are_wall_times_whose_parts_add_up():
    """A forward that sleeps 3 ms and a backward that sleeps 6 ms: wall times (process time would
    be about 0), each round's step the sum of its parts, medians and spreads of every part."""
    import time

    from moe_restore.benchmarks.common import cpu_step_times

    (row,) = cpu_step_times([(lambda: time.sleep(3e-3), lambda _: time.sleep(6e-3))], rounds=5, label="sleep")
    assert 3 <= row["fwd_ms"] < 30 and 6 <= row["bwd_ms"] < 60 and 9 <= row["fwd_bwd_ms"] < 90
    assert all(row[f"{part}_iqr_ms"] >= 0 for part in ("fwd", "bwd", "fwd_bwd"))
    assert row["fwd_ms"] + row["bwd_ms"] == pytest.approx(row["fwd_bwd_ms"], rel=1e-9)
    with pytest.raises(ValueError, match="rounds must be odd"):
        cpu_step_times([(lambda: None, lambda _: None)], rounds=4)


def test_experts_cpu_times_the_backward_apart_within_each_training_call():
    """Every implementation gets an inference, a training and a backward row; each backward sample
    is part of the training call it was timed in, so it is at most that call's time; every
    implementation computes the eager loop's function."""
    pytest.importorskip("transformers")
    from moe_restore.benchmarks.experts_cpu import IMPLEMENTATIONS, bench_shape

    rows = bench_shape(4, 16, 16, 4, 2, rounds=3, flush_mib=1)
    table = {(r["implementation"], r["what"]): r for r in rows}
    assert set(table) == {(name, what) for name in IMPLEMENTATIONS for what in ("fwd", "fwd+bwd", "bwd")}
    for name in IMPLEMENTATIONS:
        step, backward = table[name, "fwd+bwd"], table[name, "bwd"]
        assert len(backward["samples_ms"]) == len(step["samples_ms"]) == 3
        assert all(0 < b <= s for b, s in zip(backward["samples_ms"], step["samples_ms"]))
        assert backward["minor_page_faults"] is None and step["minor_page_faults"] is not None
        assert step["rel_err_vs_eager"] < 1e-5
    assert all(table["moe_restore_torch", what]["vs_ours"] == 1.0 for what in ("fwd", "fwd+bwd", "bwd"))


def test_saved_bytes_counts_each_storage_once():
    # z = x @ w saves x and w (input, parameter: skipped); sin saves z; the product saves sin(z)
    # and a view of z (z's storage, already counted): two [T, N] float32 storages in all.
    x = torch.randn(6, 3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 5))

    def forward(x):
        z = x @ w
        return z.sin() * z[:, :1]

    assert saved_bytes(forward, x, [w]) == 2 * 6 * 5 * 4
    assert saved_bytes(lambda x: (x @ w).sum(), x, [w]) == 0
    assert saved_bytes(forward, x) == 2 * 6 * 5 * 4 + 3 * 5 * 4  # w counted when not excluded


def test_triton_keeps_a_tenth_of_the_eager_loops_bytes():
    shape = MoEShape("t", 64, 32, 64, 4, 2)
    torch.manual_seed(0)
    layer = TopKMoE(shape.dim, shape.hidden, shape.experts, shape.top_k)
    x = torch.randn(shape.tokens, shape.dim, requires_grad=True)
    eager = saved_bytes(lambda x: eager_topk_moe(layer, x), x, layer.parameters()) / shape.tokens
    # The eager loop keeps at least each assignment's hidden activations (k * H float32 per token).
    assert eager >= shape.top_k * shape.hidden * 4
    triton = triton_saved_bytes_per_token(shape, torch.float32, torch.device("cpu"), 0.0)
    assert 0 < triton <= 0.1 * eager


@pytest.mark.skipif("triton" not in backends(), reason="needs the Triton backend")
def test_kept_hidden_keeps_exactly_z_more(monkeypatch):
    """``recompute_hidden=False`` on the grouped path keeps k * H * 4 bytes per token more (z of
    the two assignments of each token, float32 here), 512 at this shape, and nothing else; the
    default keeps at most the issue's 0.05x of the eager loop's bytes."""
    monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "grouped")  # these widths would take the fused path
    shape = MoEShape("t", 64, 32, 64, 4, 2)
    torch.manual_seed(0)
    layer = TopKMoE(shape.dim, shape.hidden, shape.experts, shape.top_k, backend="triton")
    x = torch.randn(shape.tokens, shape.dim, requires_grad=True)
    eager = saved_bytes(lambda x: eager_topk_moe(layer, x), x, layer.parameters()) / shape.tokens
    lean = saved_bytes(layer, x, layer.parameters()) / shape.tokens
    layer.experts.recompute_hidden = False
    kept = saved_bytes(layer, x, layer.parameters()) / shape.tokens
    assert kept - lean == shape.top_k * shape.hidden * 4 == 512
    assert 0 < lean <= 0.05 * eager


def test_plot_command_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [{"shape": s, "implementation": impl, "fwd_bwd_ms": ms, "saved_bytes_per_token": b}
            for s in ("a", "b") for impl, ms, b in (("torch", 1.0, 200.0), ("eager loop", 2.0, 3000.0))]
    rows += [{"shape": "a skew 0.50", "implementation": "torch", "fwd_bwd_ms": 1.5, "saved_bytes_per_token": 1.0,
              "skew": 0.5}]
    path = tmp_path / "moe-cpu-test.json"
    path.write_text(json.dumps({"environment": {"device": "cpu", "timing": "cpu-wall"}, "rows": rows}))
    assert cli_main(["bench", "--plot", str(path)]) == 0
    for chart in ("speed", "saved", "skew"):
        png = tmp_path / f"moe-cpu-test-{chart}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(SystemExit, match="no results file"):
        cli_main(["bench", "--plot", str(tmp_path / "missing.json")])

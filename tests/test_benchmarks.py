"""pytest-benchmark tests of the MoE ops and layers (tiny shapes, torch backend), and a smoke test
of ``moe-restore bench moe nested --quick``.

CI runs pytest with --benchmark-disable, so each benchmarked call runs once; its result is then
checked against the eager loop of ``benchmarks.eager_moe`` (the benchmarks' baseline), which is
itself a plain loop over experts. Timings here are CPU wall times, not kernel speeds.
"""
from __future__ import annotations

import json

import torch

from moe_restore.benchmarks.eager_moe import eager_nested_moe, eager_topk_moe
from moe_restore.cli import main as cli_main
from moe_restore.kernels import moe_mlp, nested_route, topk_route
from moe_restore.layers.moe import TopKMoE
from moe_restore.layers.nested_moe import NestedMoE
from utils import DEVICE, assert_close

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
    y = benchmark(moe_mlp, x, routing, layer.w1, layer.w2, layer.b1, layer.b2, backend="torch")
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
    assert layer.router.weight.grad is not None and layer.w1.grad.abs().sum() > 0


def test_bench_nested_moe_training_step(benchmark):
    torch.manual_seed(7)
    layer = NestedMoE(D, H, 5, 4, 2, 2, backend="torch").to(DEVICE)
    x = tokens(8)
    y = benchmark(training_step, layer, x)
    assert_close(y, eager_nested_moe(layer, x), torch.float32, what="NestedMoE vs eager two-level loop")
    assert layer.group_router.weight.grad.abs().sum() > 0 and layer.expert_router.weight.grad.abs().sum() > 0


def test_bench_command_quick_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RESTORE_RESULTS_DIR", str(tmp_path))
    assert cli_main(["bench", "moe", "nested", "--quick"]) == 0
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "Triton kernel timings need a GPU" in printed
    for suite, eager in (("moe", "eager loop"), ("nested", "eager two-level loop")):
        (path,) = tmp_path.glob(f"{suite}-*.json")
        result = json.loads(path.read_text())
        assert {"device", "torch", "triton", "commit"} <= set(result["environment"])
        rows = result["rows"]
        impls = {row["impl"] for row in rows}
        assert eager in impls and any(i.startswith(("torch", "nested torch")) for i in impls)
        assert ("triton" in impls or "nested triton" in impls) == torch.cuda.is_available()
        for row in rows:
            assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
            if row["rel_err_vs_eager"] is not None:
                assert row["rel_err_vs_eager"] < (3e-2 if torch.cuda.is_available() else 1e-5), row

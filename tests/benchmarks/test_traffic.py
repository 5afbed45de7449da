"""The traffic counter (``benchmarks.traffic_counter``) on toy kernels and aten ops whose bytes and
FLOPs are known exactly, the extrapolation's affinity check, and the CI regression count: one
training step at the small shapes of ``benchmarks.traffic.SMALL_SHAPES`` must not move more bytes
or do more FLOPs per token than the committed reference (``tests/benchmarks/traffic_reference.json``), shown
to fail on an injected extra copy.

Regenerate the reference after a change that lowers the counts:
``python -m moe_restore.benchmarks.traffic --quick --write-reference tests/benchmarks/traffic_reference.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_restore.benchmarks import traffic
from moe_restore.benchmarks.traffic_counter import Launch, count_launches, interpreter_on

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(not interpreter_on(), reason="counts need the Triton interpreter")

REFERENCE = Path(__file__).with_name("traffic_reference.json")


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _even_lanes_kernel(src, dst, n, BLOCK: tl.constexpr):
    """dst[i] = 2 * src[i] for even i (odd lanes masked off), read twice per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = (offs < n) & (offs % 2 == 0)
    tl.store(dst + offs, tl.load(src + offs, mask=keep) + tl.load(src + offs, mask=keep), mask=keep)


@triton.jit
def _matmul_kernel(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ b, row-major, one [BM, BN] tile per program: each A row-block is re-read by every
    column block and each B column-block by every row block."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        acc = tl.dot(tl.load(a + rm[:, None] * K + rk[None, :]), tl.load(b + rk[:, None] * N + rn[None, :]), acc)
    tl.store(c + rm[:, None] * N + rn[None, :], acc)


def _only(launches: list[Launch]) -> Launch:
    assert len(launches) == 1, [l.name for l in launches]
    return launches[0]


def test_copy_kernel_moves_each_byte_once():
    n = 1000  # not a multiple of the block: the tail lanes are masked
    src, dst = torch.randn(n), torch.empty(n)
    launch = _only(count_launches(lambda c: _copy_kernel[(triton.cdiv(n, 256),)](src, dst, n, BLOCK=256)))
    assert (launch.read_distinct, launch.read_requested, launch.write_distinct, launch.write_requested) == (
        4 * n, 4 * n, 4 * n, 4 * n)
    assert launch.flops == 0 and launch.kind == "triton" and launch.name == "_copy_kernel"
    assert torch.equal(dst, src)


def test_masked_lanes_move_nothing_and_rereads_are_requested_not_distinct():
    n = 1000
    src, dst = torch.randn(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    launch = _only(count_launches(lambda c: _even_lanes_kernel[(triton.cdiv(n, 128),)](src, dst, n, BLOCK=128)))
    even = n // 2
    assert (launch.read_distinct, launch.read_requested) == (2 * even, 2 * 2 * even)
    assert launch.write_distinct == launch.write_requested == 2 * even


def test_tiled_matmul_rereads_tiles():
    M, N, K, BM, BN, BK = 64, 96, 48, 32, 32, 16
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
    launch = _only(count_launches(lambda _: _matmul_kernel[(M // BM, N // BN)](a, b, c, M, N, K, BM=BM, BN=BN, BK=BK)))
    assert launch.read_distinct == 4 * (M * K + K * N)
    assert launch.read_requested == 4 * ((N // BN) * M * K + (M // BM) * K * N)
    assert launch.write_distinct == launch.write_requested == 4 * M * N
    assert launch.flops == 2 * M * N * K
    torch.testing.assert_close(c, a @ b, rtol=1e-2, atol=1e-2)  # tl.dot may use tf32


def test_aten_ops():
    x = torch.randn(64, 32)
    w = torch.randn(32, 16)
    dst = torch.empty(64, 32, dtype=torch.bfloat16)
    idx = torch.tensor([3, 5])

    def step(counter):
        x.t()  # a view: nothing
        x @ w
        x.expand(4, 64, 32).contiguous()
        dst.copy_(x)
        x.index_select(0, idx)
        x.new_zeros(2, 3)

    mm, expand, copy, gather, zeros = count_launches(step)
    assert mm.name == "aten.mm" and mm.flops == 2 * 64 * 32 * 16
    assert (mm.read_distinct, mm.write_distinct) == (4 * (64 * 32 + 32 * 16), 4 * 64 * 16)
    assert expand.name == "aten.clone" and expand.read_distinct == 4 * 64 * 32
    assert expand.read_requested == expand.write_distinct == 4 * 4 * 64 * 32
    assert copy.name == "aten.copy_" and (copy.read_distinct, copy.write_distinct) == (4 * 64 * 32, 2 * 64 * 32)
    # a gather reads the rows it takes (2 x 32 floats) and the indices (2 int64)
    assert gather.read_distinct == 4 * 2 * 32 + 8 * 2 and gather.write_distinct == 4 * 2 * 32
    # a factory reads only its argument's dtype and device: it writes its output alone
    assert zeros.name == "aten.new_zeros" and (zeros.read_distinct, zeros.write_distinct) == (0, 4 * 2 * 3)


def test_extrapolation_is_exact_on_multi_affine_counts_and_refuses_others():
    def copies(n, m):  # two launches: n and n * m elements
        a, b = torch.randn(n * m), torch.empty(n * m)

        def step(counter):
            _copy_kernel[(triton.cdiv(n, 128),)](a, b, n, BLOCK=128)
            _copy_kernel[(triton.cdiv(n * m, 128),)](a, b, n * m, BLOCK=128)
        return count_launches(step)

    corners = [(128, 256), (1, 2)]
    points = [(128, 1), (128, 2), (256, 1), (256, 2), (384, 3)]
    rows = traffic.extrapolate(corners, {p: copies(*p) for p in points}, (1024, 5))
    direct = copies(1024, 5)
    assert [r["read_distinct"] for r in rows] == [l.read_distinct for l in direct]
    assert [r["write_requested"] for r in rows] == [l.write_requested for l in direct]
    bent = {(n,): [Launch("k", "triton", "forward", "here", read_distinct=n * n)] for n in (1, 2, 3)}
    with pytest.raises(RuntimeError, match="not multi-affine"):
        traffic.extrapolate([(1, 2)], bent, (8,))


@pytest.mark.parametrize("shape", traffic.SMALL_SHAPES, ids=lambda s: s.name)
def test_step_does_not_move_more_than_the_reference(shape):
    reference = json.loads(REFERENCE.read_text())[shape.name]
    assert traffic.regressions(traffic.small_totals(shape), reference) == []


def test_regression_check_catches_an_injected_copy(monkeypatch):
    from moe_restore.kernels import _moe_mlp_triton

    combine = _moe_mlp_triton.combine
    monkeypatch.setattr(_moe_mlp_triton, "combine", lambda *args: combine(*args).clone())
    shape = traffic.SMALL_SHAPES[0]
    problems = traffic.regressions(traffic.small_totals(shape), json.loads(REFERENCE.read_text())[shape.name])
    # forward and backward each copy a [T, D] bf16 tensor once more: read and write, 2 * 2 * D B/token
    assert len(problems) == 2 and "distinct_B_per_token" in problems[0] and "requested_B_per_token" in problems[1]
    assert f"+{2 * 2 * 2 * shape.dim}" in problems[0]


def test_row_split_line_predicts_a_direct_count():
    """The cost of S >= 2 weight-gradient row splits, continued from runs at 1, 2 and 3 splits, equals
    a step counted at 4 splits, launch by launch (bytes; masked row tiles make FLOPs only a bound)."""
    shape = traffic.SMALL_SHAPES[0]

    def at(splits: int):
        env = {"MOE_RESTORE_ROW_SPLITS": str(splits), "MOE_RESTORE_MLP_PATH": "fused"}
        return traffic._count(traffic._moe_step(shape, shape.tokens), traffic.DEVICES["H100"], env)[0]

    one, two, three, four = (at(n) for n in (1, 2, 3, 4))
    assert len(two) > len(one)  # the sum kernels run only with several splits
    rows = traffic.with_row_splits([traffic._launch_row(l) for l in one], one, two, three, 4)
    assert [(r["name"], r["phase"], r["caller"]) for r in rows] == [(l.name, l.phase, l.caller) for l in four]
    for row, launch in zip(rows, four):
        for q in ("read_distinct", "write_distinct", "read_requested", "write_requested"):
            assert row[q] == getattr(launch, q), (launch.name, q)


def test_kept_hidden_trades_the_recomputed_gemm_for_z():
    """``--keep-hidden`` (``recompute_hidden=False``) at the small grouped shape (swiglu, bias): the
    up-projection also writes z [A, 2H] in bf16, and the hidden-gradient kernel reads it instead of
    the x rows, W1 and b1, and drops the x W1 product's 2 A D 2H FLOPs; every other launch is the same."""
    shape = traffic.SMALL_SHAPES[1]
    assert shape.activation == "swiglu"
    lean, kept = (traffic.count_small(shape, recompute_hidden=r) for r in (True, False))
    T, D, E, W = shape.tokens, shape.dim, shape.experts, 2 * shape.hidden
    A = T * shape.top_k
    assert [(l.name, l.phase) for l in lean] == [(l.name, l.phase) for l in kept]
    up_projection = False
    for a, b in zip(lean, kept):
        change = {q: getattr(b, q) - getattr(a, q) for q in ("read_distinct", "write_distinct", "flops")}
        if a.name == "_grouped_matmul_kernel" and a.phase == "forward" and change["write_distinct"]:
            assert change == {"read_distinct": 0, "write_distinct": 2 * A * W, "flops": 0}
            up_projection = True
        elif a.name == "_grouped_hidden_grad_kernel":
            assert change == {"read_distinct": 2 * (A * W - T * D - E * D * W - E * W), "write_distinct": 0,
                              "flops": -2 * A * D * W}
        else:
            assert change == {"read_distinct": 0, "write_distinct": 0, "flops": 0}, a.name
    assert up_projection


def test_kept_hidden_with_a_plain_activation_writes_no_hidden_layer():
    """``recompute_hidden=False`` with a plain activation (gelu) on the grouped path: besides the
    trade above (z written forward, read by the hidden-gradient kernel instead of x, W1 and b1,
    2 A D H FLOPs fewer), the hidden-gradient kernel no longer writes h [A, H]: dW2's kernel reads
    z in its place (as many bytes) and forms h = gelu(z) as it loads it. Every other launch is the same."""
    shape = traffic.MoEShape("t-grouped-gelu", 128, 160, 64, 4, 2, "gelu")
    lean, kept = (traffic.count_small(shape, recompute_hidden=r) for r in (True, False))
    T, D, E, H = shape.tokens, shape.dim, shape.experts, shape.hidden
    A = T * shape.top_k
    assert [(l.name, l.phase) for l in lean] == [(l.name, l.phase) for l in kept]
    seen = []
    for a, b in zip(lean, kept):
        change = {q: getattr(b, q) - getattr(a, q) for q in ("read_distinct", "write_distinct", "flops")}
        if a.name == "_grouped_matmul_kernel" and a.phase == "forward" and change["write_distinct"]:
            assert change == {"read_distinct": 0, "write_distinct": 2 * A * H, "flops": 0}
            seen.append("up-projection")
        elif a.name == "_grouped_hidden_grad_kernel":
            assert change == {"read_distinct": 2 * (A * H - T * D - E * D * H - E * H), "write_distinct": -2 * A * H,
                              "flops": -2 * A * D * H}
            seen.append("hidden gradient")
        else:  # dW2's kernel included: it reads z [A, H] where it read h [A, H]
            assert change == {"read_distinct": 0, "write_distinct": 0, "flops": 0}, a.name
    assert seen == ["up-projection", "hidden gradient"]

"""Bytes and FLOPs of one bf16 training step, per token, counted without a GPU, against the floor.

    python -m benchmarks.traffic [--quick] [--shapes S1,S2,S3,scan] [--keep-hidden]   (also: moe-restore bench traffic)

A step of the top-K MoE layer (``TopKMoE``: router Linear, ``topk_route``, ``moe_mlp``, the
routing checks and the layer's own loss bookkeeping) is its forward and the backward of its
output; a step of the gated scan (``gated_scan`` with ``d_skip`` and ``z``) likewise. Every
Triton launch and aten op is counted by ``traffic_counter`` (distinct and requested bytes, matrix
FLOPs) at each kernel's default configuration for the target GPU's tensor-core generation (what
``MOE_RESTORE_AUTOTUNE=0`` runs) and the launch sizes the library picks there (row splits from
the SM count, the scan's chunk length).

The full shapes are too large for the interpreter (one loop step of a kernel takes milliseconds
there), so each step is counted at small sizes and extrapolated. The sizes are variables in which
every count is affine when the others are held (multi-affine): the number of programs of every
launch, the trip count of every loop and every tensor's size are products of them. That holds when
all tiles are full: routing is balanced (each expert gets T*k/E rows, a multiple of every row tile;
the router is set up to pick experts (t*k + j) mod E), and the widths sampled are multiples of every
column tile. Variables: the MoE layer's T on the fused path (whose tile shapes follow the widths, so
the widths stay full size), (T, D, H) on the grouped path (fixed tiles); the scan's (B, L, D) at
the chunk length the library picks for the full L. Each variable is sampled at two values (the 2^d
corners), and the count at the full size is the multi-affine function through them. Check points
off the corners must be predicted exactly, else the run stops: the counts are then multi-affine
and the extrapolation is the count. The expert-MLP weight-gradient row splits S are pinned to 1 in the
samples, where the kernels write the gradients themselves; with S >= 2 they write S float32
partials that sum kernels read, a cost affine in S from S = 2 and independent of T. Runs at 2 and 3
splits at one sampled size give that line (``with_row_splits``), taken at S_full, the library's
rule for the target GPU at the full shape. Not modelled: where the full size's splits end in a
part-filled row tile (S1 on an H100: 33 splits of 993 rows per expert), the real kernels compute up
to one more row tile of FLOPs per split than the line says; the bytes are exact (masked lanes move
nothing).

The floor: each input read once and each output written once in forward, the output gradient read
once and each input gradient written once in backward, every parameter read once and its gradient
written once (bf16). Its FLOPs: the forward's matrix products once and twice more in backward (the
scan needs none). Roofline times are lower bounds from published peak rates (``DEVICES``): per
launch the larger of distinct bytes over bandwidth and FLOPs over the dense bf16 rate, summed over
launches (launch overheads not included), against the same bound for the floor.

``--keep-hidden`` counts the MoE steps with ``recompute_hidden=False`` (``moe_mlp``: the grouped
path's forward stores the pre-activation z, which the backward reads instead of recomputing it;
the fused path and the scan are unchanged); their shape labels end in "keep-z".
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import types
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch

from .common import format_table, write_results
from .moe import SHAPES as MOE_BENCH_SHAPES, MoEShape
from .scan import GPU_SHAPES as SCAN_BENCH_SHAPES
from .traffic_counter import Counter, Launch, count_launches, interpreter_on

QUANTITIES = ("read_distinct", "write_distinct", "read_requested", "write_requested", "flops")


@dataclass(frozen=True)
class Device:
    """Published peak rates of a GPU, and what sets its kernels' launch configurations."""

    name: str
    bandwidth: float  # HBM bytes/s
    matmul_rate: float  # dense bf16 tensor-core FLOP/s
    sms: int
    capability_major: int
    source: str


DEVICES = {
    "H100": Device("H100 SXM5", 3.35e12, 989.4e12, 132, 9,
                   "NVIDIA H100 Tensor Core GPU datasheet: SXM5 3.35 TB/s HBM3, BF16 tensor core 1,979 TFLOPS "
                   "with 2:4 sparsity, i.e. 989.4 dense; 132 SMs (Hopper architecture whitepaper)"),
    "A100": Device("A100 SXM4 80GB", 2.039e12, 312e12, 108, 8,
                   "NVIDIA A100 Tensor Core GPU datasheet: 80GB SXM 2,039 GB/s HBM2e, BF16 tensor core 312 TFLOPS "
                   "dense; 108 SMs (Ampere architecture whitepaper)"),
}


@dataclass(frozen=True)
class ScanShape:
    """A gated-scan shape: B sequences of L tokens, D channels, N states."""

    name: str
    batch: int
    length: int
    dim: int
    state: int

    @property
    def label(self) -> str:
        return f"{self.name} B{self.batch} L{self.length} D{self.dim} N{self.state}"


MOE_SHAPES = list(MOE_BENCH_SHAPES["gpu"])
SCAN_SHAPES = [ScanShape("scan", *SCAN_BENCH_SHAPES[0])]
# The CI regression shapes (tests/benchmarks/test_traffic.py): the fused path, the grouped path with swiglu,
# the scan; counted as they are (no extrapolation), in seconds under the interpreter.
SMALL_SHAPES = [MoEShape("t-fused", 256, 32, 64, 4, 2), MoEShape("t-grouped", 128, 160, 64, 4, 2, "swiglu"),
                ScanShape("t-scan", 2, 256, 32, 8)]
ROW_TILE = 64  # every expert-MLP row tile (BLOCK_M, and BLOCK_P within a split) divides this
CARRY_BLOCK = 32  # the scan's default carry block (chunks combined per step)


# ---------------------------------------------------------------------------------------------
# The steps


def _moe_step(shape: MoEShape, tokens: int, recompute_hidden: bool = True) -> Callable[[Counter], None]:
    """The layer in bf16 on ``tokens`` tokens with balanced routing (see the module docstring), its
    experts with ``recompute_hidden``."""
    from moe_restore.layers import TopKMoE

    E, k = shape.experts, shape.top_k
    if shape.dim < E:
        raise ValueError(f"balanced routing needs dim >= experts, got {shape.dim} < {E}")
    torch.manual_seed(0)
    layer = TopKMoE(shape.dim, shape.hidden, E, k, activation=shape.activation).to(torch.bfloat16)
    layer.experts.recompute_hidden = recompute_hidden
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E)  # logits = x[:, :E]
    x = torch.randn(tokens, shape.dim)
    t = torch.arange(tokens)
    x[:, :E] = -4.0
    for j in range(k):  # token t prefers experts (t*k + j) mod E, in order j
        x[t, (t * k + j) % E] = 4.0 - j
    counts = torch.bincount(x[:, :E].topk(k, dim=-1).indices.flatten(), minlength=E)
    if not bool((counts == tokens * k // E).all()):
        raise ValueError(f"{shape.label}: T = {tokens} does not spread evenly over the experts: {counts.tolist()}")
    x = x.to(torch.bfloat16).requires_grad_()
    dy = torch.randn(tokens, shape.dim, dtype=torch.bfloat16)

    def step(counter: Counter) -> None:
        counter.phase = "forward"
        y = layer(x)
        counter.phase = "backward"
        y.backward(dy)

    return step


def _scan_step(shape: ScanShape, length: int) -> Callable[[Counter], None]:
    from moe_restore.kernels.gated_scan import gated_scan

    g = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=g).to(torch.bfloat16).requires_grad_()

    B, D, N = shape.batch, shape.dim, shape.state
    u, f, z = rand(B, length, D), rand(B, length, D), rand(B, length, D)
    bm, cm = rand(B, length, N), rand(B, length, N)
    d_skip = torch.randn(D, generator=g).requires_grad_()
    dy = torch.randn(B, length, D, generator=g).to(torch.bfloat16)

    def step(counter: Counter) -> None:
        counter.phase = "forward"
        out = gated_scan(u, f, bm, cm, d_skip=d_skip, z=z, backend="triton")
        counter.phase = "backward"
        out.backward(dy)

    return step


# ---------------------------------------------------------------------------------------------
# Launch sizes and configurations of the target GPU


@contextlib.contextmanager
def _pinned_env(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the duration."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class _FullScale:
    """How a sampled run's row-split decision scales to the full shape: assignments times
    ``assignments``, weight-gradient blocks per expert times ``blocks``."""

    assignments: int
    blocks: int


@contextlib.contextmanager
def _target_gpu(device: Device, scale: _FullScale | None, full_splits: list[int]) -> Iterator[None]:
    """Kernels take ``device``'s tile generation. With ``scale``, each row-split decision also
    appends to ``full_splits`` the split count the library's rule (``_row_splits``) gives on
    ``device`` at the full shape, while the run itself keeps the count pinned by
    MOE_RESTORE_ROW_SPLITS."""
    from moe_restore.kernels import _moe_mlp_fused, _moe_mlp_grouped, _moe_mlp_tiles, _tuning

    original = _moe_mlp_tiles._row_splits

    def row_splits(num_assignments: int, num_experts: int, blocks_per_expert: int, where: torch.device) -> int:
        if scale is not None:
            props = types.SimpleNamespace(multi_processor_count=device.sms)
            with mock.patch.object(torch.cuda, "get_device_properties", lambda _: props), \
                    _pinned_env({"MOE_RESTORE_ROW_SPLITS": None}):
                full_splits.append(original(num_assignments * scale.assignments, num_experts,
                                            blocks_per_expert * scale.blocks, torch.device("cuda")))
        return original(num_assignments, num_experts, blocks_per_expert, where)

    with mock.patch.object(_tuning.ArchTuned, "for_device",
                           lambda tuned, _: tuned.for_capability(device.capability_major)), \
            mock.patch.object(_moe_mlp_fused, "_row_splits", row_splits), \
            mock.patch.object(_moe_mlp_grouped, "_row_splits", row_splits):
        yield


def _count(step: Callable[[Counter], None], device: Device, env: dict[str, str | None],
           scale: _FullScale | None = None) -> tuple[list[Launch], list[int]]:
    from moe_restore.kernels import _interpreter

    full_splits: list[int] = []
    # The count is of the Triton path's launches, whose traffic does not depend on the values: the
    # interpreter's wrong bfloat16 products (which make ``backend=None`` take the torch backend for
    # bfloat16 on the CPU) change no byte or FLOP counted, so that refusal is lifted here.
    with _pinned_env(env), _target_gpu(device, scale, full_splits), _interpreter.launches_only():
        return count_launches(step), full_splits


# ---------------------------------------------------------------------------------------------
# Extrapolation


def _signature(launches: list[Launch]) -> list[tuple[str, str, str, str]]:
    return [(l.name, l.kind, l.phase, l.caller) for l in launches]


def multilinear(corners: Sequence[tuple[int, int]], values: dict[tuple[int, ...], int], point: Sequence[int]
                ) -> Fraction:
    """The function that is affine in each variable separately (the product of the variables'
    lines), through ``values`` at the 2^d corners (one low and one high value per variable), at
    ``point``; exact rational arithmetic."""
    total = Fraction(0)
    for bits in itertools.product((0, 1), repeat=len(corners)):
        weight = Fraction(1)
        for (low, high), bit, p in zip(corners, bits, point):
            weight *= Fraction(p - low, high - low) if bit else Fraction(high - p, high - low)
        total += weight * values[tuple(c[b] for c, b in zip(corners, bits))]
    return total


def extrapolate(corners: Sequence[tuple[int, int]], runs: dict[tuple[int, ...], list[Launch]],
                target: Sequence[int]) -> list[dict[str, Any]]:
    """Each launch's quantities at ``target`` by ``multilinear`` through the corner runs.

    ``runs`` maps size points to the launches counted there: the 2^d corners and any number of
    check points. Every run must hold the same launches in the same order, and at every check point
    every quantity must equal the prediction from the corners exactly (RuntimeError naming the
    launch otherwise): the counts are then multi-affine in the sizes, and the prediction is the count.
    """
    points = list(runs)
    if any(_signature(runs[p]) != _signature(runs[points[0]]) for p in points):
        raise RuntimeError("the sampled sizes launch different kernels; the count cannot be extrapolated")
    corner_points = {tuple(c[b] for c, b in zip(corners, bits))
                     for bits in itertools.product((0, 1), repeat=len(corners))}
    checks = [p for p in points if p not in corner_points]
    result = []
    for i, launch in enumerate(runs[points[0]]):
        row = {"name": launch.name, "kind": launch.kind, "phase": launch.phase, "caller": launch.caller}
        for q in QUANTITIES:
            values = {p: getattr(runs[p][i], q) for p in points}
            for p in checks:
                predicted = multilinear(corners, values, p)
                if predicted != values[p]:
                    raise RuntimeError(f"{launch.name} ({launch.caller}, {launch.phase}): {q} is not multi-affine "
                                       f"in the sizes: {values[p]} counted at {p}, {float(predicted)} predicted")
            row[q] = float(multilinear(corners, values, target))
        result.append(row)
    return result


def _launch_row(launch: Launch) -> dict[str, Any]:
    return {"name": launch.name, "kind": launch.kind, "phase": launch.phase, "caller": launch.caller,
            **{q: float(getattr(launch, q)) for q in QUANTITIES}}


def with_row_splits(rows: list[dict], one: list[Launch], two: list[Launch], three: list[Launch],
                    splits: int) -> list[dict]:
    """``rows`` (counted at one row split) at ``splits`` >= 2, from runs at one, two and three
    splits of the same size. With one split the weight-gradient kernels write the gradients
    themselves; with S >= 2 they write S float32 partials and sum kernels (absent at one split)
    read them: the cost is affine in S from S = 2, so each launch gains (two - one) + (S - 2) *
    (three - two), and a launch only the split runs have counts two + (S - 2) * (three - two)."""
    if _signature(two) != _signature(three):
        raise RuntimeError("two and three row splits launch different kernels")
    result, i = [], 0
    for b, c in zip(two, three):
        matched = i < len(one) and _signature([one[i]]) == _signature([b])
        row = rows[i] if matched else {**_launch_row(b), **{q: 0.0 for q in QUANTITIES}}
        for q in QUANTITIES:
            base = getattr(one[i], q) if matched else 0
            row[q] += getattr(b, q) - base + (splits - 2) * (getattr(c, q) - getattr(b, q))
        result.append(row)
        i += matched
    if i != len(one):
        raise RuntimeError("a launch at one row split is missing at two")
    return result


# ---------------------------------------------------------------------------------------------
# Counting a shape


def _moe_plan(shape: MoEShape) -> tuple[bool, list[tuple[int, int]], list[tuple[int, ...]], tuple[int, ...]]:
    """(fused path?, corners, check points, target) over (T,) on the fused path, where the tile
    shapes follow the widths, and over (T, D, H) on the grouped path, whose tiles are fixed
    (ROW_TILE divides every width used)."""
    from moe_restore.kernels._moe_mlp_triton import use_fused_path

    fused = use_fused_path(shape.dim, shape.dim, shape.activation, torch.bfloat16)
    # balanced routing: every expert gets a multiple of ROW_TILE rows (2 * ROW_TILE for two splits)
    unit = (2 if fused else 1) * ROW_TILE * shape.experts // shape.top_k
    if shape.tokens % unit or shape.tokens < 3 * unit:
        raise ValueError(f"{shape.label}: T must be a multiple of {unit} and at least {3 * unit}")
    if fused:
        return True, [(unit, 2 * unit)], [(3 * unit,)], (shape.tokens,)
    d1 = ROW_TILE * -(-shape.experts // ROW_TILE)  # the router's balanced logits need D >= E
    widths = [(d1, d1 + ROW_TILE), (ROW_TILE, 2 * ROW_TILE)]
    if shape.dim % ROW_TILE or shape.hidden % ROW_TILE or shape.dim < d1 + 2 * ROW_TILE:
        raise ValueError(f"{shape.label}: D and H must be multiples of {ROW_TILE}, D >= {d1 + 2 * ROW_TILE}")
    return (False, [(unit, 2 * unit), *widths], [(3 * unit, d1, ROW_TILE), (2 * unit, d1 + 2 * ROW_TILE, 3 * ROW_TILE)],
            (shape.tokens, shape.dim, shape.hidden))


def count_moe(shape: MoEShape, device: Device, recompute_hidden: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Per-launch counts (totals at the full shape) and how they were obtained; the experts run with
    ``recompute_hidden`` (``moe_mlp``)."""
    fused, corners, checks, target = _moe_plan(shape)
    env = {"MOE_RESTORE_ROW_SPLITS": "1", "MOE_RESTORE_MLP_PATH": "fused" if fused else "grouped"}
    points = [tuple(c[b] for c, b in zip(corners, bits)) for bits in itertools.product((0, 1), repeat=len(corners))]
    runs, full_splits = {}, set()
    for point in [*points, *checks]:
        sample = replace(shape, tokens=point[0], **({} if fused else {"dim": point[1], "hidden": point[2]}))
        blocks = 1 if fused else (shape.dim // sample.dim) * (shape.hidden // sample.hidden)
        runs[point], splits = _count(_moe_step(sample, sample.tokens, recompute_hidden), device, env,
                                     _FullScale(shape.tokens // sample.tokens, blocks))
        full_splits.update(splits)
    rows = extrapolate(corners, runs, target)
    if len(full_splits) > 1:
        raise NotImplementedError(f"{shape.label}: launches with different row splits {full_splits} on {device.name}")
    splits = full_splits.pop() if full_splits else 1
    if splits > 1:
        if not fused:
            raise NotImplementedError(f"{shape.label}: {splits} row splits on the grouped path (widths are scaled)")
        two, three = (_count(_moe_step(shape, points[0][0], recompute_hidden), device,
                             {**env, "MOE_RESTORE_ROW_SPLITS": str(n)})[0]
                      for n in (2, 3))
        rows = with_row_splits(rows, runs[points[0]], two, three, splits)
    return rows, {"path": "fused" if fused else "grouped", "variables": ["T"] if fused else ["T", "D", "H"],
                  "corners": corners, "checks": checks, "row_splits": splits, "recompute_hidden": recompute_hidden}


def count_scan(shape: ScanShape, device: Device) -> tuple[list[dict], dict[str, Any]]:
    """As ``count_moe``, over (B, L, D) with the chunk length the library picks for the full L: the
    kernels' programs are (chunk, channel block, batch) triples, the channel blocks (BLOCK_D) and
    the carry kernel's state blocks (BLOCK_E) divide every D sampled, and the checks cover a chunk
    count that is not a multiple of the carry block."""
    from moe_restore.kernels._gated_scan_triton import chunk_length

    with _pinned_env({"MOE_RESTORE_SCAN_CHUNK": None}):
        chunk = chunk_length(shape.length)
    block_d = 64  # a multiple of the chunk kernels' BLOCK_D (32) and the backward's channel block (64)
    if shape.length % chunk or shape.dim % block_d or shape.dim < 2 * block_d or shape.state > 16:
        raise ValueError(f"{shape.label}: L must be a multiple of {chunk}, D of {block_d} and >= {2 * block_d}, "
                         f"N <= 16")
    # At least two channel blocks: with one, dBm and dCm need no sum kernel (other launches).
    corners = [(1, 2), (2 * chunk, 4 * chunk), (2 * block_d, 3 * block_d)]
    checks = [(3, 6 * chunk, 4 * block_d)]
    env = {"MOE_RESTORE_SCAN_CHUNK": str(chunk), "MOE_RESTORE_SCAN_CARRY_BLOCK": str(CARRY_BLOCK)}
    points = [tuple(c[b] for c, b in zip(corners, bits)) for bits in itertools.product((0, 1), repeat=3)]
    runs = {p: _count(_scan_step(replace(shape, batch=p[0], dim=p[2]), p[1]), device, env)[0]
            for p in [*points, *checks]}
    return (extrapolate(corners, runs, (shape.batch, shape.length, shape.dim)),
            {"variables": ["B", "L", "D"], "corners": corners, "checks": checks, "chunk": chunk})


def count_small(shape: MoEShape | ScanShape, device: Device = DEVICES["H100"],
                recompute_hidden: bool = True) -> list[Launch]:
    """The launches of one step at ``shape`` as it is (no extrapolation), with one row split and the
    scan's default chunk and carry block: the CI regression count (MoE experts with ``recompute_hidden``)."""
    if isinstance(shape, ScanShape):
        step = _scan_step(shape, shape.length)
        env = {"MOE_RESTORE_SCAN_CHUNK": "64", "MOE_RESTORE_SCAN_CARRY_BLOCK": str(CARRY_BLOCK)}
    else:
        step = _moe_step(shape, shape.tokens, recompute_hidden)
        env = {"MOE_RESTORE_ROW_SPLITS": "1", "MOE_RESTORE_MLP_PATH": "auto"}
    return _count(step, device, env)[0]


# ---------------------------------------------------------------------------------------------
# Floors, rooflines, tables


def floor(shape: MoEShape | ScanShape) -> dict[str, float]:
    """Bytes and FLOPs of the floor for one step (module docstring), bf16 activations and weights."""
    if isinstance(shape, ScanShape):
        tokens = shape.batch * shape.length
        per_token = 2 * (4 * shape.dim + 2 * shape.state)  # fwd: u, f, z, Bm, Cm in, out; bwd the mirror
        return {"tokens": tokens, "bytes": 2 * tokens * per_token + 2 * 4 * shape.dim, "flops": 0}
    T, D, H, E, k = shape.tokens, shape.dim, shape.hidden, shape.experts, shape.top_k
    up = 2 * H if shape.activation == "swiglu" else H
    params = E * D + E * (D * up + up + H * D + D)  # router, w1, b1, w2, b2
    activations = 4 * T * D * 2  # x, y, dy, dx
    flops = 3 * 2 * (T * D * E + T * k * (D * up + H * D))
    return {"tokens": T, "bytes": activations + 2 * 2 * params, "flops": flops}


def roofline_ms(bytes_moved: float, flops: float, device: Device) -> float:
    """The lower bound on one launch's time: the larger of its bytes and its FLOPs over the peak rates."""
    return max(bytes_moved / device.bandwidth, flops / device.matmul_rate) * 1e3


def summarize(label: str, rows: list[dict], shape_floor: dict[str, float], device: Device) -> dict[str, Any]:
    """Per-kernel rows grouped by (phase, name, caller), per token, and the shape's totals."""
    tokens = shape_floor["tokens"]
    groups: dict[tuple, dict] = defaultdict(lambda: {q: 0.0 for q in QUANTITIES} | {"launches": 0, "roofline_ms": 0.0})
    for row in rows:
        group = groups[(row["phase"], row["kind"], row["name"], row["caller"])]
        for q in QUANTITIES:
            group[q] += row[q]
        group["launches"] += 1
        group["roofline_ms"] += roofline_ms(row["read_distinct"] + row["write_distinct"], row["flops"], device)
    kernels = []
    for (phase, kind, name, caller), g in groups.items():
        kernels.append({"phase": phase, "kind": kind, "kernel": name, "caller": caller, "launches": g["launches"],
                        "distinct_B_per_token": (g["read_distinct"] + g["write_distinct"]) / tokens,
                        "requested_B_per_token": (g["read_requested"] + g["write_requested"]) / tokens,
                        "read_distinct_B_per_token": g["read_distinct"] / tokens,
                        "write_distinct_B_per_token": g["write_distinct"] / tokens,
                        "flops_per_token": g["flops"] / tokens, "roofline_ms": g["roofline_ms"]})
    total = {q: sum(r[q] for r in rows) for q in QUANTITIES}
    distinct = (total["read_distinct"] + total["write_distinct"]) / tokens
    floor_bytes, floor_flops = shape_floor["bytes"] / tokens, shape_floor["flops"] / tokens
    roof = sum(k["roofline_ms"] for k in kernels)
    floor_roof = roofline_ms(shape_floor["bytes"], shape_floor["flops"], device)
    return {"shape": label, "device": device.name, "kernels": kernels, "totals": {
        "distinct_B_per_token": distinct,
        "requested_B_per_token": (total["read_requested"] + total["write_requested"]) / tokens,
        "flops_per_token": total["flops"] / tokens,
        "floor_B_per_token": floor_bytes, "floor_flops_per_token": floor_flops,
        "bytes_vs_floor": distinct / floor_bytes,
        "flops_vs_floor": total["flops"] / shape_floor["flops"] if shape_floor["flops"] else None,
        "roofline_ms": roof, "floor_roofline_ms": floor_roof, "roofline_vs_floor": roof / floor_roof,
        "launches": len(rows)}}


KERNEL_COLUMNS = ("phase", "kernel", "caller", "launches", "distinct_B_per_token", "requested_B_per_token",
                  "flops_per_token", "roofline_ms")


def condensed(kernels: list[dict]) -> list[dict]:
    """The per-kernel rows for a table: each Triton kernel on its own, the aten ops of one caller
    and phase together (their names listed in order)."""
    rows: dict[tuple, dict] = {}
    for k in kernels:
        key = (k["phase"], k["kernel"] if k["kind"] == "triton" else "aten", k["caller"])
        if key not in rows:
            rows[key] = {"phase": k["phase"], "kernel": key[1], "caller": k["caller"], "launches": 0, "ops": [],
                         "distinct_B_per_token": 0.0, "requested_B_per_token": 0.0, "flops_per_token": 0.0,
                         "roofline_ms": 0.0}
        row = rows[key]
        for q in ("launches", "distinct_B_per_token", "requested_B_per_token", "flops_per_token", "roofline_ms"):
            row[q] += k[q]
        row["ops"].append(k["kernel"].removeprefix("aten."))
    for row in rows.values():
        if row["kernel"] == "aten":
            row["kernel"] = "aten: " + ", ".join(dict.fromkeys(row["ops"]))
        del row["ops"]
    return list(rows.values())
TOTAL_COLUMNS = ("shape", "device", "launches", "distinct_B_per_token", "requested_B_per_token", "floor_B_per_token",
                 "bytes_vs_floor", "flops_per_token", "floor_flops_per_token", "flops_vs_floor", "roofline_ms",
                 "floor_roofline_ms", "roofline_vs_floor")


def label(shape: MoEShape | ScanShape, recompute_hidden: bool = True) -> str:
    """The shape's label in the tables: "keep-z" appended for a MoE step counted with
    ``recompute_hidden=False``."""
    return shape.label if recompute_hidden or isinstance(shape, ScanShape) else f"{shape.label} keep-z"


def count_shape(shape: MoEShape | ScanShape, device: Device, recompute_hidden: bool = True) -> dict[str, Any]:
    """The summary (``summarize``) of one full shape on one target GPU, with how it was counted (a
    MoE step's experts with ``recompute_hidden``)."""
    if isinstance(shape, ScanShape):
        rows, method = count_scan(shape, device)
    else:
        rows, method = count_moe(shape, device, recompute_hidden)
    summary = summarize(label(shape, recompute_hidden), rows, floor(shape), device)
    summary["method"] = method
    return summary


REGRESSION_KEYS = ("distinct_B_per_token", "requested_B_per_token", "flops_per_token")


def small_totals(shape: MoEShape | ScanShape) -> dict[str, float]:
    """Distinct bytes, requested bytes and FLOPs per token of one step at a small shape (``count_small``)."""
    device = DEVICES["H100"]
    totals = summarize(shape.name, [l.as_dict() for l in count_small(shape, device)], floor(shape), device)["totals"]
    return {key: totals[key] for key in REGRESSION_KEYS}


def regressions(totals: dict[str, float], reference: dict[str, float]) -> list[str]:
    """One line per quantity of ``REGRESSION_KEYS`` that ``totals`` has above ``reference``."""
    return [f"{key}: {totals[key]:g} > reference {reference[key]:g} (+{totals[key] - reference[key]:g})"
            for key in REGRESSION_KEYS if totals[key] > reference[key]]


def _rerun_interpreted(argv: list[str]) -> int:
    """This suite needs the Triton interpreter: run it in a subprocess with TRITON_INTERPRET=1."""
    done = subprocess.run([sys.executable, "-m", "moe_restore.benchmarks.traffic", *argv],
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small CI shapes only, counted as they are")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated names of the shapes to count (default: S1,S2,S3,scan)")
    parser.add_argument("--devices", default="H100,A100", help=f"target GPUs, of {', '.join(DEVICES)}")
    parser.add_argument("--keep-hidden", action="store_true",
                        help="count the MoE steps with moe_mlp's recompute_hidden=False (the grouped path keeps "
                             "the pre-activation for backward)")
    parser.add_argument("--write-reference", metavar="JSON", default=None,
                        help="write the small shapes' totals per token (the CI reference) to JSON and stop")
    parser.add_argument("--from-json", nargs="+", metavar="RESULTS.json", default=None,
                        help="count nothing: print the tables of saved results and write them as one result")
    args = parser.parse_args(argv)
    if args.from_json:
        _report([s for path in args.from_json for s in json.loads(Path(path).read_text())["shapes"]])
        return 0
    if not interpreter_on():
        return _rerun_interpreted(argv)
    if args.write_reference:
        reference = {shape.name: small_totals(shape) for shape in SMALL_SHAPES}
        Path(args.write_reference).write_text(json.dumps(reference, indent=2) + "\n")
        print(json.dumps(reference, indent=2))
        return 0
    devices = [DEVICES[name] for name in args.devices.split(",")]
    shapes: list[MoEShape | ScanShape] = SMALL_SHAPES if args.quick else [*MOE_SHAPES, *SCAN_SHAPES]
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s.name for s in shapes})
        if unknown:
            parser.error(f"unknown shape(s) {unknown}; choose from {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in wanted]
    summaries = []
    for device in devices:
        for shape in shapes:
            recompute = not args.keep_hidden
            if args.quick:
                launches = [l.as_dict() for l in count_small(shape, device, recompute)]
                summary = summarize(label(shape, recompute), launches, floor(shape), device)
            else:
                summary = count_shape(shape, device, recompute)
            summaries.append(summary)
    _report(summaries)
    return 0


def _display(rows: list[dict]) -> list[dict]:
    """Rows for printing: counts per token of 10 or more as whole numbers (3 significant digits
    would hide the differences that matter)."""
    return [{k: (round(v) if isinstance(v, float) and abs(v) >= 10 and not k.endswith(("_ms", "_floor")) else v)
             for k, v in row.items()} for row in rows]


def _report(summaries: list[dict]) -> None:
    """Print the tables of ``summaries`` and write them, with the peak rates, as one JSON result."""
    print("Device-independent counts of one bf16 training step (bytes and matrix FLOPs per token); "
          "roofline times are lower bounds from published peak rates, not measurements.")
    for device in DEVICES.values():
        mine = [s for s in summaries if s["device"] == device.name]
        if not mine:
            continue
        print(f"\n{device.name}: {device.source}")
        for summary in mine:
            print(f"\n{summary['shape']} on {device.name}")
            print(format_table(_display(condensed(summary["kernels"])), KERNEL_COLUMNS))
        print()
        print(format_table(_display([{**s["totals"], "shape": s["shape"], "device": s["device"]} for s in mine]),
                           TOTAL_COLUMNS))
    path = write_results("traffic", [{**s["totals"], "shape": s["shape"], "device": s["device"]} for s in summaries],
                         {"counts": "device-independent (Triton interpreter + TorchDispatchMode)",
                          "devices": {k: asdict(v) for k, v in DEVICES.items()}, "shapes": summaries})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    sys.exit(main())

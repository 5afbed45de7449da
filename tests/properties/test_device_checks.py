"""A Routing is checked where it enters ``moe_mlp``: a hand-built one whose offsets or assignments
are inconsistent is refused on both backends before any kernel reads it (a ValueError here; on a
GPU the Triton path's refusal is a device-side assert, tested in a subprocess so that the CUDA
context of this session survives)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_restore.kernels import Routing, moe_mlp, routing_from_topk, topk_route
from utils import DEVICE, assert_close, raising_backends

T, K, E, D, H = 6, 2, 3, 8, 12


def good_routing() -> Routing:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [2.0, 1.0, 3.0],
                           [3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    return topk_route(logits.to(DEVICE), K, backend="torch")


def _swap_across_experts(r: Routing) -> Routing:
    # Positions 0 (expert 0's segment) and 5 (expert 1's: offsets are [0, 4, 8, 12]) swap ids.
    order = r.sorted_assignments.clone()
    order[[0, 5]] = order[[5, 0]]
    return dataclasses.replace(r, sorted_assignments=order)


def _poke(r: Routing, field: str, index: int, value: int) -> Routing:
    t = getattr(r, field).clone()
    t[index] = value
    return dataclasses.replace(r, **{field: t})


BAD = {
    "offsets not from 0": lambda r: _poke(r, "expert_offsets", 0, 1),
    "offsets not ending at T*k": lambda r: _poke(r, "expert_offsets", E, T * K - 1),
    "offsets past T*k": lambda r: _poke(r, "expert_offsets", E, T * K + 5),
    "offsets decreasing": lambda r: _poke(r, "expert_offsets", 1, 9),
    "assignment id too large": lambda r: _poke(r, "sorted_assignments", 3, T * K),
    "assignment id negative": lambda r: _poke(r, "sorted_assignments", 3, -1),
    "assignment listed twice": lambda r: _poke(r, "sorted_assignments", 1, int(r.sorted_assignments[0])),
    "assignments in another expert's segment": _swap_across_experts,
    "experts disagree with the layout": lambda r: dataclasses.replace(r, experts=(r.experts + 1) % E),
    "expert id out of range": lambda r: _poke(r, "experts", (2, 0), E),
}


def expert_weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, D, H, generator=gen).to(DEVICE), torch.randn(E, H, D, generator=gen).to(DEVICE)


def test_the_good_routing_is_accepted_on_both_backends():
    r = good_routing()
    assert r.expert_offsets.tolist() == [0, 4, 8, 12]  # what the hand-made cases above assume
    x = torch.randn(T, D, device=DEVICE)
    w1, w2 = expert_weights()
    outs = [moe_mlp(x, r, w1, w2, backend=b) for b in raising_backends()]
    for out in outs[1:]:
        assert_close(out, outs[0], torch.float32, backend="triton", what="triton vs torch")


@pytest.mark.parametrize("backend", raising_backends())
@pytest.mark.parametrize("case", list(BAD))
def test_inconsistent_routing_is_refused(backend, case):
    r = BAD[case](good_routing())
    w1, w2 = expert_weights()
    with pytest.raises(ValueError, match="routing is inconsistent"):
        moe_mlp(torch.randn(T, D, device=DEVICE), r, w1, w2, backend=backend)


@pytest.mark.parametrize("backend", raising_backends())
def test_refusal_names_the_broken_rules(backend):
    r, (w1, w2), x = good_routing(), expert_weights(), torch.randn(T, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"inconsistent: not expert_offsets is non-decreasing; not each segment"):
        moe_mlp(x, BAD["offsets decreasing"](r), w1, w2, backend=backend)
    with pytest.raises(ValueError, match=r"inconsistent: not expert_offsets\[-1\] == T\*k$"):
        moe_mlp(x, BAD["offsets past T*k"](r), w1, w2, backend=backend)


@pytest.mark.parametrize("backend", raising_backends())
def test_only_a_routing_changed_since_routing_is_checked_again(backend, monkeypatch):
    """A routing as a routing function returned it is consistent by construction and is not
    checked again; one derived from it, or written in place since, is."""
    import moe_restore.kernels._device_checks as checks

    calls = []
    real = checks.routing_rules_held
    monkeypatch.setattr(checks, "routing_rules_held", lambda r: calls.append(r) or real(r))
    r, (w1, w2), x = good_routing(), expert_weights(), torch.randn(T, D, device=DEVICE)
    moe_mlp(x, r, w1, w2, backend=backend)
    assert calls == []
    moe_mlp(x, dataclasses.replace(r), w1, w2, backend=backend)
    assert len(calls) == 1
    r.expert_offsets[1] = 9  # in place: now decreasing
    with pytest.raises(ValueError, match="not expert_offsets is non-decreasing"):
        moe_mlp(x, r, w1, w2, backend=backend)


def test_compiled_torch_backend_refuses_with_its_assert():
    """Under torch.compile the check is a ``torch._assert_async`` in the graph (no host read): a
    bad routing raises its RuntimeError instead of reaching the grouped GEMMs."""
    torch._dynamo.reset()
    r, (w1, w2), x = good_routing(), expert_weights(), torch.randn(T, D, device=DEVICE)
    run = torch.compile(lambda x, offsets: moe_mlp(x, dataclasses.replace(r, expert_offsets=offsets), w1, w2,
                                                   backend="torch"), fullgraph=True, backend="aot_eager")
    assert torch.equal(run(x, r.expert_offsets), moe_mlp(x, r, w1, w2, backend="torch"))
    with pytest.raises(RuntimeError, match="routing is inconsistent"):
        run(x, BAD["offsets decreasing"](r).expert_offsets)


@pytest.mark.parametrize("backend", raising_backends())
@pytest.mark.parametrize("bad_id", [-1, E, 2])
def test_routing_from_topk_refuses_ids_out_of_range_or_repeated(backend, bad_id):
    experts = torch.tensor([[0, 1], [2, bad_id], [1, 0]], device=DEVICE)
    with pytest.raises(ValueError, match=r"experts hold ids outside \[0, 3\) or an id twice in a row"):
        routing_from_topk(experts, torch.ones(3, 2, device=DEVICE), E, backend=backend)


@pytest.mark.parametrize("field,value,error,match", [
    ("expert_offsets", torch.tensor([0, 4, 8, 12], dtype=torch.int32), TypeError, "expert_offsets must be int64"),
    ("expert_offsets", torch.tensor([0, 4, 12]), ValueError, r"expert_offsets must have shape \(4,\)"),
    ("sorted_assignments", torch.arange(11), ValueError, r"sorted_assignments must have shape \(12,\)"),
    ("weights", torch.ones(T, K + 1), ValueError, r"weights must have shape \(6, 2\)"),
    ("experts", torch.zeros(T, dtype=torch.int64), ValueError, r"experts must have shape \[T, k\]"),
])
def test_malformed_routing_tensors_are_named(field, value, error, match):
    r = dataclasses.replace(good_routing(), **{field: value.to(DEVICE)})
    w1, w2 = expert_weights()
    for backend in raising_backends():
        with pytest.raises(error, match=match):
            moe_mlp(torch.randn(T, D, device=DEVICE), r, w1, w2, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side assert needs a GPU")
@pytest.mark.parametrize("what", ["nan scores", "bad routing"])
def test_triton_path_refuses_on_the_gpu_with_a_device_assert(what):
    """On a GPU the Triton path's check fails in the stream: the process reports a device-side
    assert at the next synchronisation instead of running the kernels on the bad input."""
    bad = ("r = topk_route(torch.tensor([[1.0, float('nan')]], device='cuda'), 1, backend='triton')"
           if what == "nan scores" else
           "r = topk_route(torch.randn(4, 2, device='cuda'), 1, backend='triton')\n"
           "r = dataclasses.replace(r, expert_offsets=torch.tensor([0, 9, 4], device='cuda'))\n"
           "moe_mlp(torch.randn(4, 8, device='cuda'), r, torch.randn(2, 8, 8, device='cuda'),\n"
           "        torch.randn(2, 8, 8, device='cuda'), backend='triton')")
    script = textwrap.dedent("""
        import dataclasses, torch
        from moe_restore.kernels import moe_mlp, topk_route
        try:
        {bad}
            torch.cuda.synchronize()
        except RuntimeError as error:  # at the synchronisation, or at a launch after the assert
            print("refused:", error)
            raise SystemExit(3)
        print("accepted")
    """).format(bad=textwrap.indent(bad, "    "))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "device-side assert" in done.stdout + done.stderr

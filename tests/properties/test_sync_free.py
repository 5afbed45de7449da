"""The Triton path makes no host read: a forward and backward of TopKMoE, NestedMoE and the gated
scan reads nothing back from the device (checks are device-side asserts), so on a GPU a layer can
be captured in a CUDA graph and replayed. The dense shared expert reads nothing on either backend.

A host read is counted two ways, so that one hidden inside a custom op's implementation is seen
too: the profiler's record of every aten op (ops that read a value back, e.g.
``_local_scalar_dense`` behind ``.item()``/``bool()``, or ``bincount``/``nonzero``, which size their
output from the data), except the read that ``torch._assert_async`` itself makes on the CPU, where
it is synchronous; and Python-level spies on the Tensor methods that return host values
(``tolist``, ``numpy``, ...), which do not go through the dispatcher.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_restore.kernels import gated_scan
from moe_restore.layers import DenseMLP, NestedMoE, TopKMoE
from utils import DEVICE, assert_close

SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::bincount", "aten::nonzero", "aten::equal",
               "aten::is_nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
               "aten::unique_consecutive"}
HOST_METHODS = ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")


def _inside_assert_async(event) -> bool:
    while event is not None:
        if event.name == "aten::_assert_async":
            return True
        event = event.cpu_parent
    return False


def host_reads(fn, monkeypatch) -> list[str]:
    """The host reads that ``fn()`` makes (see the module docstring)."""
    reads: list[str] = []
    for name in HOST_METHODS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: reads.append("torch.cuda.synchronize"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    monkeypatch.undo()
    return reads + [e.name for e in prof.events() if e.name in SYNCING_OPS and not _inside_assert_async(e)]


def _layers():
    torch.manual_seed(0)
    return {"topk": TopKMoE(16, 24, 4, 2, num_shared_experts=1, backend="triton"),
            "nested": NestedMoE(16, 24, 3, 2, 2, 1, group_context_dim=4, backend="triton")}


@pytest.mark.parametrize("name", ["topk", "nested", "topk-keep"])
def test_layer_forward_backward_makes_no_host_read(name, monkeypatch):
    layer = _layers()[name.removesuffix("-keep")].to(DEVICE)
    if name == "topk-keep":  # the grouped path with the pre-activation kept for backward
        monkeypatch.setenv("MOE_RESTORE_MLP_PATH", "grouped")
        layer.experts.recompute_hidden = False
    x = torch.randn(2, 10, 16, device=DEVICE, requires_grad=True)
    args = (torch.randn(2, 4, device=DEVICE),) if name == "nested" else ()

    def step():
        y = layer(x, *args)
        (y.square().sum() + layer.aux_loss).backward()

    step()  # the first call compiles (or probes the GPU) and may read on the host
    assert host_reads(step, monkeypatch) == []
    assert x.grad.abs().sum() > 0


def test_gated_scan_forward_backward_makes_no_host_read(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    u, f, bm, cm = (torch.randn(*s, generator=gen).to(DEVICE).requires_grad_()
                    for s in ((2, 12, 8), (2, 12, 8), (2, 12, 4), (2, 12, 4)))

    def step():
        gated_scan(u, f, bm, cm, backend="triton").square().sum().backward()

    step()
    assert host_reads(step, monkeypatch) == []


def test_shared_expert_makes_no_host_read_on_either_backend(monkeypatch):
    """The shared expert is a DenseMLP in torch ops (no routing, no ``moe_mlp``): its forward and
    backward read nothing back, and on the torch backend (whose grouped GEMM reads its offsets) a
    layer with shared experts makes exactly the reads of the same layer without them."""
    shared = DenseMLP(16, 48, 16, activation="swiglu").to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    assert host_reads(lambda: shared(x).square().sum().backward(), monkeypatch) == []
    assert x.grad.abs().sum() > 0

    def reads(num_shared_experts: int) -> list[str]:
        torch.manual_seed(2)
        layer = TopKMoE(16, 24, 4, 2, num_shared_experts=num_shared_experts, backend="torch").to(DEVICE)
        layer(x)  # the first call may probe the device
        return host_reads(lambda: layer(x).square().sum().backward(), monkeypatch)

    assert reads(2) == reads(0) != []


def test_host_read_counter_sees_reads(monkeypatch):
    """The counter is not blind: the torch backend's grouped GEMM op reads its expert offsets
    inside itself (``_moe_mlp_torch``), and a plain ``bincount`` or ``bool()`` is seen."""
    layer = TopKMoE(16, 24, 4, 2, backend="torch").to(DEVICE)
    x = torch.randn(10, 16, device=DEVICE)
    assert "Tensor.tolist" in host_reads(lambda: layer(x), monkeypatch)
    assert host_reads(lambda: torch.bincount(torch.tensor([1, 2]), minlength=4), monkeypatch) == ["aten::bincount"]
    assert "aten::_local_scalar_dense" in host_reads(lambda: bool(torch.tensor(1.0) > 0), monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["topk", "nested"])
def test_layer_replays_in_a_cuda_graph(name):
    layer = _layers()[name].cuda()
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(64, 16, device="cuda", requires_grad=True)
    args = (torch.randn(1, 4, device="cuda"),) if name == "nested" else ()

    def step():
        y = layer(x.view(1, 64, 16), *args)
        grads = torch.autograd.grad(y.square().sum() + layer.aux_loss, [x, *params])
        return y, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # autotune, compile and probe before the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the step raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, grads_graph = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y_eager, grads_eager = step()
    assert_close(y_graph, y_eager, torch.float32, what="graph replay output")
    for got, want in zip(grads_graph, grads_eager):
        assert_close(got, want, torch.float32, what="graph replay gradient")

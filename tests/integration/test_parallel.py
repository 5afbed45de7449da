"""ExpertParallel on 2 and 4 gloo processes (CPU, float64, torch backend) against the
single-process layer on all ranks' tokens together: the output and the input gradient of each
rank's tokens, the expert weights' gradients (gathered from their shards), the router's and the
shared experts' gradients summed over the ranks. Uneven token counts, a rank without tokens and
a routing that sends every token to one rank's experts (the other ranks compute nothing) are
included; the expert dimension of a 2-D mesh; then the errors for a bad mesh, the source rank of
the weights, and a distributed checkpoint round trip."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module

from distributed import run_on_ranks
from moe_restore.layers import NestedMoE, TopKMoE
from moe_restore.parallel import ExpertParallel
from utils import assert_close

DTYPE = torch.float64
# The routing weights are float32 whatever the layer's dtype, so what flows back through them (dx's
# router term, the router's gradients) is float32 arithmetic in a different order: float32's tolerance.
ROUTED = torch.float32
# Tokens per rank: uneven, and rank 1 has none.
TOKENS = (5, 0, 9, 3)


def _layers(world: int):
    """(name, single-process layer, tokens per rank (leading dim), whether it reads a per-image context)
    of each case."""
    torch.manual_seed(0)
    topk = TopKMoE(6, 5, 8, 2, activation="swiglu", num_shared_experts=1, backend="torch").to(DTYPE)
    # Every token prefers experts 0 and 1 (rank 0's): coordinate 0 of the tokens is large and only
    # those experts' router rows read it.
    skewed = TopKMoE(6, 5, 8, 2, scoring="sigmoid", bias=False, backend="torch").to(DTYPE)
    with torch.no_grad():
        skewed.router.weight[:, 0] = torch.tensor([4.0, 4.0] + [-4.0] * 6)
    nested = NestedMoE(6, 5, 4, 2, 2, 1, activation="gelu", group_context_dim=3, backend="torch").to(DTYPE)
    counts = TOKENS[:world]
    return [("topk", topk, counts, False), ("skewed", skewed, counts, False),
            ("nested", nested, tuple(c // 2 for c in counts), True)]


def _check_case(rank: int, world: int, name: str, reference, counts: tuple[int, ...], with_context: bool) -> None:
    mesh = init_device_mesh("cpu", (world,))
    layer = parallelize_module(copy.deepcopy(reference), mesh, ExpertParallel())
    dtype, backend = reference.experts.w1.dtype, reference.backend
    gen = torch.Generator().manual_seed(1)
    shape = (sum(counts), 3, 6) if with_context else (sum(counts), 6)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if name == "skewed":
        x[..., 0] = 3.0
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    context = torch.randn(sum(counts), 3, generator=gen, dtype=dtype) if with_context else None
    mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))

    x_all = x.clone().requires_grad_()
    extra = (context,) if with_context else ()
    y_all = reference(x_all, *extra)
    (y_all * dy).sum().backward()

    x_mine = x[mine].clone().requires_grad_()
    y = layer(x_mine, *((context[mine],) if with_context else ()))
    (y * dy[mine]).sum().backward()

    what = f"{name}, {world} ranks, rank {rank}"
    assert_close(y, y_all[mine], dtype, backend=backend, what=f"{what}: output")
    assert_close(x_mine.grad, x_all.grad[mine], ROUTED, backend=backend, what=f"{what}: dx")
    received = reference.last_routing.expert_counts().view(world, -1).sum(1)
    if name == "skewed":
        assert received[1:].sum() == 0  # every token went to rank 0's experts
    for key, want in reference.named_parameters():
        got = dict(layer.named_parameters())[key]
        if key.startswith("experts."):
            assert isinstance(got, DTensor) and got.placements == (Shard(0),)
            assert got.to_local().shape[0] == reference.experts.num_experts // world
            assert torch.equal(got.full_tensor(), want.detach())
            grad = got.grad.full_tensor()
        else:  # replicated: this rank's tokens' share, summed over the ranks as data parallelism does
            assert torch.equal(got, want)
            grad = got.grad.clone()
            dist.all_reduce(grad)
        assert_close(grad, want.grad, ROUTED if key.startswith("router.") else dtype, backend=backend,
                     what=f"{what}: gradient of {key}")


def _equal_to_single_process(rank: int, world: int, backend: str) -> None:
    if backend == "torch":
        cases = _layers(world)
    else:  # float32, Triton routing (no host offsets) and kernels on the rows that came through the exchange
        torch.manual_seed(0)
        cases = [("triton", TopKMoE(6, 5, 8, 2, activation="gelu", backend="triton"), TOKENS[:world], False)]
    for case in cases:
        _check_case(rank, world, *case)


@pytest.mark.parametrize("world", [2, 4])
def test_forward_and_gradients_equal_the_single_process_layer(world):
    run_on_ranks(world, _equal_to_single_process, "torch")


def _expert_dimension_of_a_2d_mesh(rank: int, world: int) -> None:
    """EP over the "ep" dimension of a (dp=2, ep=world/2) mesh: each dp replica holds all the experts,
    so the experts' gradients are summed over "dp" and everything else's over all ranks (docs/parallel.md)."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)
    reference = TopKMoE(6, 5, 4, 2, activation="silu", backend="torch").to(DTYPE)
    layer = parallelize_module(copy.deepcopy(reference), mesh["ep"], ExpertParallel())
    gen = torch.Generator().manual_seed(2)
    x, dy = (torch.randn(4 * world, 6, generator=gen, dtype=DTYPE) for _ in range(2))
    mine = slice(4 * rank, 4 * (rank + 1))
    (reference(x) * dy).sum().backward()
    (layer(x[mine]) * dy[mine]).sum().backward()
    for key, want in reference.named_parameters():
        got = dict(layer.named_parameters())[key]
        if isinstance(got, DTensor):
            grad = got.grad.to_local()
            dist.all_reduce(grad, group=mesh["dp"].get_group())
            grad = got.grad.full_tensor()
        else:
            grad = got.grad.clone()
            dist.all_reduce(grad)
        assert_close(grad, want.grad, ROUTED if key.startswith("router.") else DTYPE,
                     what=f"2-D mesh, rank {rank}: gradient of {key}")


def test_expert_dimension_of_a_2d_mesh():
    run_on_ranks(4, _expert_dimension_of_a_2d_mesh)


@pytest.mark.slow
def test_triton_backend_under_expert_parallelism():
    run_on_ranks(2, _equal_to_single_process, "triton")


def _refusals_and_checkpoint(rank: int, world: int, checkpoint: str) -> None:
    layer = TopKMoE(6, 5, 2 * world, 2, backend="torch")
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        parallelize_module(layer, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep")),
                           ExpertParallel())
    mesh = init_device_mesh("cpu", (world,))
    with pytest.raises(ValueError, match="5 experts do not divide over 2 ranks"):
        parallelize_module(TopKMoE(6, 5, 5, 2), mesh, ExpertParallel())
    with pytest.raises(TypeError, match="MoE layer"):
        parallelize_module(torch.nn.Linear(3, 3), mesh, ExpertParallel())
    parallelize_module(layer, mesh, ExpertParallel())
    with pytest.raises(RuntimeError, match="sharded already"):
        parallelize_module(layer, mesh, ExpertParallel())

    # Ranks that start from different weights: by default all take rank 0's (router broadcast,
    # experts scattered); with src_data_rank=None each keeps its own router and its own slice.
    torch.manual_seed(1 + rank)
    own = TopKMoE(6, 5, 2 * world, 2, backend="torch")
    kept = parallelize_module(copy.deepcopy(own), mesh, ExpertParallel(), src_data_rank=None)
    assert torch.equal(kept.router.weight, own.router.weight)
    assert torch.equal(kept.experts.w1.to_local(), own.experts.w1.chunk(world)[rank])
    restored = parallelize_module(own, mesh, ExpertParallel())
    routers = [torch.empty_like(restored.router.weight) for _ in range(world)]
    dist.all_gather(routers, restored.router.weight.detach())
    assert all(torch.equal(r, routers[0]) for r in routers)

    # Distributed checkpoint: each rank writes its shard; another sharded layer reads them back.
    dcp.save(layer.state_dict(), checkpoint_id=checkpoint)
    state = restored.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    restored.load_state_dict(state)
    for (key, want), got in zip(layer.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(got.full_tensor() if isinstance(got, DTensor) else got,
                           want.full_tensor() if isinstance(want, DTensor) else want), key


def test_refusals_and_distributed_checkpoint(tmp_path):
    run_on_ranks(2, _refusals_and_checkpoint, str(tmp_path / "checkpoint"))

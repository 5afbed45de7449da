"""Expert parallelism: ``parallelize_module(layer, mesh, ExpertParallel())`` for TopKMoE and NestedMoE.

On a 1-D DeviceMesh of W ranks, rank r keeps the experts [r*E_l, (r+1)*E_l), E_l = E / W (the
bank's w1, w2, b1, b2 become DTensors sharded on the expert dimension, ``Shard(0)``); the router
and the shared experts stay whole on every rank. Each rank feeds its own tokens x [T_r, D]; the
router routes them as before (assignment a = t*k + j to expert e[a] with weight w[a]), then

    1. dispatch: the T_r*k assignments, ordered by expert (the routing's ``sorted_assignments``),
       fall into W contiguous runs, one per owner rank owner(e) = e // E_l; row x[a // k] of each
       goes to its owner (differentiable ``all_to_all_single``), after the counts per
       (rank, local expert) [W, E_l] are exchanged and read on the host (the one synchronisation);
    2. compute: the owner runs each received row u_i through its local expert l_i = e_i mod E_l
       with weight 1, ``z_i = Expert_{l_i}(u_i)`` (``moe_mlp`` over a ``routing_from_topk`` of the
       ids [N, 1]), so every row is computed: no capacity, no token dropped;
    3. combine: z goes back to the sender by the reverse ``all_to_all_single``, and
       y[t] = sum_j w[t*k + j] * z[t*k + j] (in float32 or wider, as ``moe_mlp`` combines).

The backward is the same exchange in reverse (an all_to_all's gradient is the opposite
all_to_all), so dx and the routing weights' gradients arrive at the rank that holds the token,
and each expert's weight gradient is summed over the rows of every rank on its owner: the
gradients of the sharded weights equal the single-process gradients over all ranks' tokens. The
router's and the shared experts' gradients on a rank are those of its own tokens; their sum over
the ranks (an all-reduce, as data parallelism does) is the single-process gradient.

The layer is attached through its experts bank (``layer.experts``), not through the layer's
classes: its weights are sharded with ``distribute_module`` and the exchange is the bank's forward
pre-hook (steps 1-2's inputs) and forward hook (step 3), around the bank's own ``forward``, which
runs ``moe_mlp`` on the local shards of its weights. So any ``MoE`` whose ``experts`` is an
``ExpertMLPs`` called positionally as ``experts(tokens [T, D], routing)`` is served (TopKMoE, NestedMoE and
their 2-D forms). Bytes sent per token and how to launch it: ``docs/parallel.md``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from moe_restore.kernels import Routing, routing_from_topk
from moe_restore.layers.experts import ExpertMLPs
from moe_restore.layers.moe import MoE

__all__ = ["ExpertParallel"]

_EXPERT_PARAMETERS = ("w1", "w2", "b1", "b2")


def _check_expert_mesh(mesh: DeviceMesh, num_experts: int) -> int:
    """E_l = num_experts / W for a 1-D ``mesh`` of W ranks; ValueError for a mesh of another
    dimension or a W that does not divide the experts."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"ExpertParallel needs a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        names = f" (dims {mesh.mesh_dim_names})" if mesh.mesh_dim_names else ""
        raise ValueError(f"ExpertParallel needs a 1-D DeviceMesh, got a {mesh.ndim}-D mesh of shape "
                         f"{tuple(mesh.shape)}{names}: pass the expert-parallel dimension, e.g. mesh['ep']")
    world = mesh.size()
    if num_experts % world:
        raise ValueError(f"ExpertParallel splits the experts evenly over the mesh: {num_experts} experts do not "
                         f"divide over {world} ranks (the number of experts must be a multiple of the mesh size)")
    return num_experts // world


@dataclass
class _Pending:
    """What step 3 needs of step 1: the assignments' expert order, the routing weights [T, k] and
    the rows per rank sent and received."""

    order: torch.Tensor
    weights: torch.Tensor
    send_sizes: list[int]
    recv_sizes: list[int]


class _TokenExchange:
    """The bank's forward pre-hook (``dispatch``: steps 1-2's inputs) and forward hook
    (``combine``: step 3) of the module docstring, for one bank on one mesh."""

    def __init__(self, mesh: DeviceMesh, local_experts: int):
        self.group = mesh.get_group()
        self.world, self.local_experts = mesh.size(), local_experts
        # Set by a call's dispatch, read by its combine: the bank's hooks run in that order, one call at a time.
        self.pending: _Pending | None = None

    def _exchange(self, rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
        # Waited on at once: the kernels read the rows through their pointers, which a pending
        # functional collective's result does not have yet.
        return funcol.wait_tensor(funcol.all_to_all_single(rows.contiguous(), out_sizes, in_sizes, self.group))

    def dispatch(self, bank: nn.Module, inputs: tuple, _mesh: DeviceMesh) -> tuple[torch.Tensor, Routing]:
        if len(inputs) != 2 or not isinstance(inputs[1], Routing):
            raise TypeError("an expert-parallel bank is called as experts(tokens [T, dim], routing): the routing "
                            "tells which rank each token goes to")
        tokens, routing = inputs
        if routing.num_experts != bank.num_experts:
            raise ValueError(f"routing is over {routing.num_experts} experts but the bank holds {bank.num_experts}")
        k = routing.top_k
        order = routing.sorted_assignments
        send = tokens[order // k]
        # Assignments per (destination rank, its local expert): experts are owned in contiguous runs.
        counts = routing.expert_counts().view(self.world, self.local_experts).contiguous()
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        sizes = torch.cat([counts.sum(1), recv_counts.sum(1)]).tolist()
        send_sizes, recv_sizes = sizes[:self.world], sizes[self.world:]
        received = self._exchange(send, recv_sizes, send_sizes)
        # Each source's rows arrive ordered by local expert, so the ids are runs of 0..E_l-1.
        local_ids = torch.arange(self.local_experts, device=tokens.device).repeat(self.world)
        local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1), output_size=received.shape[0])
        local = routing_from_topk(local_ids[:, None], torch.ones(local_ids.shape[0], 1, device=tokens.device),
                                  self.local_experts, backend=bank.backend)
        self.pending = _Pending(order, routing.weights, send_sizes, recv_sizes)
        return received, local

    def combine(self, _bank: nn.Module, outputs: torch.Tensor, _mesh: DeviceMesh) -> torch.Tensor:
        state, self.pending = self.pending, None
        returned = self._exchange(outputs, state.send_sizes, state.recv_sizes)
        # Back from expert order to assignment order a = t*k + j.
        per_assignment = torch.zeros_like(returned).index_copy(0, state.order, returned)
        T, k = state.weights.shape
        # Weighted in float32 at least (float64 stays float64), as moe_mlp accumulates its combine.
        dtype = torch.promote_types(returned.dtype, torch.float32)
        y = (per_assignment.view(T, k, returned.shape[1]).to(dtype) * state.weights.unsqueeze(-1)).sum(1)
        return y.to(outputs.dtype)


class ExpertParallel(ParallelStyle):
    """Expert parallelism for an ``MoE`` layer (TopKMoE, NestedMoE, their 2-D forms) on a 1-D mesh:
    ``parallelize_module(layer, mesh, ExpertParallel())``; the math is in the module docstring.

    After it, rank r of the W ranks holds experts [r*E/W, (r+1)*E/W) as DTensors ``Shard(0)`` of the
    full [E, ...] weights (``layer.experts.w1.full_tensor()`` gathers them; ``state_dict`` works
    with ``torch.distributed.checkpoint``), and the layer is called on each rank with that rank's
    own tokens (any count, 0 included). With ``parallelize_module``'s ``src_data_rank`` (default 0)
    every rank starts from that rank's weights: its experts are scattered and its router and shared
    experts broadcast (None: each rank keeps its own values, which must then agree).

    Raises TypeError for a module that is not such a layer, ValueError for a mesh that is not 1-D
    or whose size does not divide the number of experts, RuntimeError for a layer already sharded.
    Gradients: see the module docstring (all-reduce the router's and the shared experts' over the
    mesh as data parallelism does; never the experts').
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoE) or not isinstance(module.experts, ExpertMLPs):
            raise TypeError(f"ExpertParallel applies to an MoE layer with an ExpertMLPs bank (TopKMoE, NestedMoE), "
                            f"got {type(module).__name__}")
        bank = module.experts
        if getattr(bank, "_distribute_module_applied", False):
            raise RuntimeError(f"the experts of this {type(module).__name__} are sharded already")
        local_experts = _check_expert_mesh(device_mesh, bank.num_experts)
        if self.src_data_rank is not None:
            # The router and the shared experts are replicated: everyone takes the source rank's.
            source = dist.get_global_rank(device_mesh.get_group(), self.src_data_rank)
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                if not any(tensor is getattr(bank, name) for name in _EXPERT_PARAMETERS):
                    dist.broadcast(tensor.data, src=source, group=device_mesh.get_group())
        exchange = _TokenExchange(device_mesh, local_experts)

        def shard(_name: str, submodule: nn.Module, mesh: DeviceMesh) -> None:
            # distribute_module visits the bank (which has no children); its four weights go Shard(0).
            for key in _EXPERT_PARAMETERS:
                param = getattr(submodule, key)
                if param is not None:
                    sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                    submodule.register_parameter(key, nn.Parameter(sharded, requires_grad=param.requires_grad))

        distribute_module(bank, device_mesh, shard, input_fn=exchange.dispatch, output_fn=exchange.combine)
        return module

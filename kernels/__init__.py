"""moe_restore.kernels: Triton kernels for MoE routing, grouped expert MLPs and gated scans.

Each op has a Triton implementation (forward and backward, behind an autograd Function) and a
vectorised eager PyTorch implementation; ``backend=`` chooses (see ``_backend``, which also
states the autocast policy shared by every op). Public submodules: ``naive`` (one plain PyTorch
reference per op), ``activations`` (the expert activations by name) and ``validation``
(argument checks).
"""
from ._backend import BACKENDS
from .gated_scan import ORDERS, gated_scan, gated_scan_2d
from .moe_mlp import ACTIVATIONS, ActivationSpec, moe_mlp
from .nested_routing import nested_route
from .routing import SCORINGS, Routing, routing_from_topk, topk_route

__all__ = ["ACTIVATIONS", "ActivationSpec", "BACKENDS", "ORDERS", "SCORINGS", "Routing", "gated_scan", "gated_scan_2d", "moe_mlp",
           "nested_route", "routing_from_topk", "topk_route"]

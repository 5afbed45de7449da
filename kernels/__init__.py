"""moe_restore.kernels: Triton kernels for MoE routing, grouped expert MLPs and gated scans.

Each op has a Triton implementation (forward and backward, behind an autograd Function) and a
vectorised eager PyTorch implementation; ``backend=`` chooses (see ``_backend``).
"""
from .gated_scan import gated_scan, gated_scan_2d
from .moe_mlp import moe_mlp
from .nested_routing import nested_route
from .routing import Routing, topk_route

__all__ = ["Routing", "gated_scan", "gated_scan_2d", "moe_mlp", "nested_route", "topk_route"]

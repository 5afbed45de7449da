"""moe_restore.kernels: Triton kernels for MoE routing, grouped expert MLPs and gated scans.

Each op has a Triton implementation (forward and backward, behind an autograd Function) and a
vectorised eager PyTorch implementation; ``backend=`` chooses (see ``_backend``; the autocast policy shared by every
op is in ``_autocast``). Public submodules: ``naive`` (the float64 reference of every op),
``activations`` (the expert activations by name), ``validation`` (argument checks) and
``settings`` (every environment variable the library reads, its default, and when it is read).
"""
import sys as _sys


def _hand_over_the_top_level_name() -> None:
    """This folder imported as a top-level ``kernels`` (not as ``moe_restore.kernels``, the only
    name it is installed under): the repository root is on ``sys.path``, as ``python -m pytest`` or
    a script run from the root puts it. The name belongs to Hugging Face's ``kernels`` package,
    which transformers imports, so load that one from the rest of ``sys.path`` and put it in
    ``sys.modules`` in this module's place (the import statement returns what ``sys.modules``
    holds once this file has run); if it is not installed, ``import kernels`` fails as it would
    without this folder. The folder's own modules are not loaded under the top-level name, so no
    second copy of the ops (and of their Triton kernels) comes into being."""
    import importlib.util
    import os
    from importlib.machinery import PathFinder

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in _sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        del _sys.modules[__name__]
        raise ModuleNotFoundError(
            f"No module named 'kernels': {os.path.dirname(os.path.abspath(__file__))} is moe_restore.kernels (import "
            "it under that name); Hugging Face's kernels package is not installed", name="kernels")
    module = importlib.util.module_from_spec(spec)
    _sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[__name__]
        raise


if __name__ == "kernels":
    _hand_over_the_top_level_name()
else:
    from ._backend import BACKENDS
    from .gated_scan import ORDERS, gated_scan, gated_scan_2d
    from .moe_mlp import ACTIVATIONS, ActivationSpec, moe_mlp
    from .nested_routing import nested_route
    from .router_losses import router_loss_stats
    from .routing import SCORINGS, Routing, routing_from_topk, topk_route

    __all__ = ["ACTIVATIONS", "ActivationSpec", "BACKENDS", "ORDERS", "SCORINGS", "Routing", "gated_scan",
               "gated_scan_2d", "moe_mlp", "nested_route", "router_loss_stats", "routing_from_topk", "topk_route"]

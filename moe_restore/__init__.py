"""moe-restore: fast MoE layers and gated selective scans, and two all-in-one restoration networks.

Importing the package registers ``experts_implementation="moe_restore"`` with transformers, by the
explicit call ``integration.register()`` below, when transformers is installed (whichever of the two
is imported first; docs/integration.md). Where transformers is absent it does nothing.
"""
from . import integration
from .integration import IntegrationReport, replace_moe, upcycle_ffn
from .layers import MambaStyleAttention, NestedMoE, NestedMoE2d, TopKMoE, TopKMoE2d

__version__ = "0.1.0"
__all__ = ["IntegrationReport", "MambaStyleAttention", "NestedMoE", "NestedMoE2d", "TopKMoE", "TopKMoE2d",
           "replace_moe", "upcycle_ffn"]

integration.register()

"""moe-restore: fast MoE layers and gated selective scans, and two all-in-one restoration networks."""
from .integration import IntegrationReport, replace_moe, upcycle_ffn
from .layers import MambaStyleAttention, NestedMoE, NestedMoE2d, TopKMoE, TopKMoE2d

__version__ = "0.1.0"
__all__ = ["IntegrationReport", "MambaStyleAttention", "NestedMoE", "NestedMoE2d", "TopKMoE", "TopKMoE2d",
           "replace_moe", "upcycle_ffn"]

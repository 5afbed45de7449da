"""moe-restore: fast MoE layers and gated selective scans, and two all-in-one restoration networks."""
from .layers import MambaStyleAttention, NestedMoE, NestedMoE2d, TopKMoE, TopKMoE2d

__version__ = "0.1.0"
__all__ = ["MambaStyleAttention", "NestedMoE", "NestedMoE2d", "TopKMoE", "TopKMoE2d"]

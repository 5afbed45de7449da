"""nn.Modules over the kernels: the MoE layers, Mamba-style attention and the networks' blocks."""
from .mamba_attention import MambaStyleAttention
from .moe import TopKMoE, TopKMoE2d
from .nested_moe import NestedMoE, NestedMoE2d

__all__ = ["MambaStyleAttention", "NestedMoE", "NestedMoE2d", "TopKMoE", "TopKMoE2d"]

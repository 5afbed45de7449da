"""nn.Modules over the kernels: the MoE composition and its parts, the MoE layers, Mamba-style
attention and the networks' blocks."""
from .experts import ExpertMLPs
from .mamba_attention import MambaStyleAttention
from .moe import MoE, MoERecord
from .topk_moe import TopKMoE, TopKMoE2d
from .nested_moe import NestedMoE, NestedMoE2d
from .routers import ContextLinear, NestedRouter, RouterLosses, TopKRouter

__all__ = ["ContextLinear", "ExpertMLPs", "MambaStyleAttention", "MoE", "MoERecord", "NestedMoE", "NestedMoE2d",
           "NestedRouter", "RouterLosses", "TopKMoE", "TopKMoE2d", "TopKRouter"]

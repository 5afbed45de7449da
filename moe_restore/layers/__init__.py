"""nn.Modules over the kernels: the MoE composition and its parts (routers, experts, the dense shared
expert), the named MoE layers assembled from them, Mamba-style attention and the networks' blocks."""
from .experts import DenseMLP, ExpertMLPs, check_experts, shared_banks_to_dense
from .mamba_attention import MambaStyleAttention
from .moe import MoE, MoERecord
from .nested_moe import NestedMoE, NestedMoE2d
from .pixels import per_pixel, pixel_tokens
from .routers import ContextLinear, NestedRouter, RouterLosses, TopKRouter
from .topk_moe import TopKMoE, TopKMoE2d

__all__ = ["ContextLinear", "DenseMLP", "ExpertMLPs", "MambaStyleAttention", "MoE", "MoERecord", "NestedMoE",
           "NestedMoE2d", "NestedRouter", "RouterLosses", "TopKMoE", "TopKMoE2d", "TopKRouter", "check_experts",
           "per_pixel", "pixel_tokens", "shared_banks_to_dense"]

"""MiM-DiT: a diffusion transformer whose feed-forward layers are MoE-in-MoE, for all-in-one
image restoration. ``model`` (configuration, backbone surgery, forward), ``flow_matching``
(rectified-flow training loss), ``sampling`` (flow-matching Euler sampler), ``persistence``
(save and reload)."""
from .model import MiMDiT, MiMDiTConfig

__all__ = ["MiMDiT", "MiMDiTConfig"]

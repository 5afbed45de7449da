"""moe-restore: fast MoE layers and gated selective scans, and two all-in-one restoration networks."""
__version__ = "0.1.0"

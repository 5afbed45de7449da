"""Benchmarks of the kernels and layers (installed as moe_restore.benchmarks)."""

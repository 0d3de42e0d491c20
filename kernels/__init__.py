"""Numba kernels for the LoRA math on float32 arrays."""

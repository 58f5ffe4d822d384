"""Quantization numerics and the solvers: one small module per solver."""

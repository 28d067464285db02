"""Benchmarks against flax.nnx, flax.linen and PyTorch: ``python -m benchmarks.run``."""

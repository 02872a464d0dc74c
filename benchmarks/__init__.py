"""Benchmarks: memory, throughput, kernels, activations. Run as ``python -m benchmarks SUITE``."""

"""One module per fused op: Triton kernels, launchers, the autograd.Function, the PyTorch reference."""

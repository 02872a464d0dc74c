"""leapkernels: fused Triton kernels (with PyTorch references) for LeapAlign and Flux blocks."""

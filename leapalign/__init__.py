"""leapalign: LeapAlign post-training of flow-matching text-to-image models on fused kernels."""
__version__ = "0.1.0"

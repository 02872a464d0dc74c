"""leapkernels: fused Triton kernels (with PyTorch references) for LeapAlign and Flux blocks.

Public API (each op: forward + backward kernels per backend, an autograd.Function that saves
inputs and recomputes intermediates, and a plain-PyTorch ``*_reference`` used as the truth in
tests). Backend choice: `leapkernels.backend` (``LEAPKERNELS_BACKEND=triton|reference|native|auto``).
"""
from leapkernels.backend import BackendUnavailableError, force_backend, select_backend
from leapkernels.ops.grad_scale import grad_scale, grad_scale_reference
from leapkernels.ops.leap_connector import leap, leap_connector, leap_connector_reference

__all__ = [
    "BackendUnavailableError",
    "force_backend",
    "select_backend",
    "grad_scale",
    "grad_scale_reference",
    "leap",
    "leap_connector",
    "leap_connector_reference",
]

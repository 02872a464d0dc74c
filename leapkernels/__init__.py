"""leapkernels: fused Triton kernels (with PyTorch references) for LeapAlign and diffusion-transformer blocks.

`apply_leapkernels(transformer)` patches a diffusers FLUX.1, FLUX.2 or SD3 transformer (chosen by
its class; `supported_models()`), `revert_leapkernels` undoes it bit for bit.

Every op has forward and backward kernels per backend, an autograd.Function that saves inputs
and recomputes intermediates, and a plain-PyTorch ``*_reference`` that tests use as the truth.
Backend choice: `leapkernels.backend` (``LEAPKERNELS_BACKEND=triton|reference|native|auto``).
"""
from leapkernels.backend import BackendUnavailableError, force_backend, select_backend
from leapkernels.flux import FluxPatchOptions, apply_leapkernels_to_flux
from leapkernels.flux2 import Flux2PatchOptions, apply_leapkernels_to_flux2
from leapkernels.sd3 import SD3PatchOptions, apply_leapkernels_to_sd3
from leapkernels.ops.gated_linear import gated_linear, gated_linear_reference
from leapkernels.ops.gated_mlp import gated_mlp, gated_mlp_reference
from leapkernels.ops.gated_residual import gated_residual, gated_residual_reference
from leapkernels.ops.gelu import gelu_linear, gelu_linear_reference, gelu_tanh, gelu_tanh_reference
from leapkernels.ops.grad_scale import grad_scale, grad_scale_reference
from leapkernels.ops.leap_connector import leap, leap_connector, leap_connector_reference
from leapkernels.ops.modulated_layernorm import (
    ada_layernorm_continuous,
    ada_layernorm_continuous_reference,
    modulated_layernorm,
    modulated_layernorm_reference,
)
from leapkernels.ops.swiglu import (
    gated_swiglu_linear,
    gated_swiglu_linear_reference,
    swiglu,
    swiglu_linear,
    swiglu_linear_reference,
    swiglu_reference,
)
from leapkernels.ops.qk_norm_rope import (
    linear_qk_norm_rope,
    linear_qk_norm_rope_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
)
from leapkernels.patch import (
    UnsupportedModelError,
    apply_leapkernels,
    is_patched,
    patch_options,
    revert_leapkernels,
    supported_models,
)
from leapkernels import native  # noqa: E402  (after the ops: native joins their registry)

native.register_all()  # CPU tensors then run the C++ kernels where built (see leapkernels.native.status())

__all__ = [
    "BackendUnavailableError",
    "force_backend",
    "select_backend",
    "leap",
    "leap_connector",
    "leap_connector_reference",
    "grad_scale",
    "grad_scale_reference",
    "modulated_layernorm",
    "modulated_layernorm_reference",
    "ada_layernorm_continuous",
    "ada_layernorm_continuous_reference",
    "gated_residual",
    "gated_residual_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "gelu_tanh",
    "gelu_tanh_reference",
    "gelu_linear",
    "gelu_linear_reference",
    "gated_linear",
    "gated_linear_reference",
    "gated_mlp",
    "gated_mlp_reference",
    "linear_qk_norm_rope",
    "linear_qk_norm_rope_reference",
    "swiglu",
    "swiglu_reference",
    "swiglu_linear",
    "swiglu_linear_reference",
    "gated_swiglu_linear",
    "gated_swiglu_linear_reference",
    "apply_leapkernels",
    "revert_leapkernels",
    "is_patched",
    "patch_options",
    "supported_models",
    "UnsupportedModelError",
    "apply_leapkernels_to_flux",
    "FluxPatchOptions",
    "apply_leapkernels_to_flux2",
    "Flux2PatchOptions",
    "apply_leapkernels_to_sd3",
    "SD3PatchOptions",
]

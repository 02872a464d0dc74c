"""Block-level pieces every model patch shares (FLUX.1, FLUX.2, SD3): each computes one piece of a
diffusers block either with the fused ops or with diffusers' own eager arithmetic, whichever the
inputs and the switches allow, plus the diffusers version guard and the bookkeeping of a revert.

Fused only when the inputs allow it: one dtype and device, per-sample modulation rows ``[B, D]``
(a per-token modulation, FLUX.2's KV-cache mode, runs eagerly), plain ``nn.Linear`` projections
(LoRA-wrapped or hooked ones are called as modules), inactive dropout.
"""
from __future__ import annotations

import types
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import nn

from leapkernels.flux_attention import plain_linear, same_dtype_device
from leapkernels.ops.gated_linear import gated_linear
from leapkernels.ops.gated_mlp import gated_mlp
from leapkernels.ops.gated_residual import gated_residual
from leapkernels.ops.gelu import gelu_linear, gelu_tanh
from leapkernels.ops.modulated_layernorm import ada_layernorm_continuous, modulated_layernorm
from leapkernels.ops.swiglu import gated_swiglu_linear, swiglu, swiglu_linear, swiglu_reference

VERIFIED_DIFFUSERS = SpecifierSet(">=0.42.1,<0.43")
"""diffusers releases whose blocks the patched forwards were checked against (0.42.1 is what CI
installs and the parity tests run on; setup.py pins the same range)."""

OPTIONS = "_leapkernels_options"
"""Instance attribute holding a patched module's switches (its presence marks it patched)."""
ORIGINAL_PROCESSOR = "_leapkernels_original_processor"
"""Instance attribute of an attention module holding the processor the patch replaced."""


class UnverifiedDiffusersError(RuntimeError):
    """The installed diffusers is not one the patched block forwards were verified against."""


def check_diffusers_version(allow_unverified: bool = False) -> str:
    """The installed diffusers version; raises `UnverifiedDiffusersError` unless it is in
    `VERIFIED_DIFFUSERS` (with ``allow_unverified``: warns instead)."""
    import diffusers

    installed = diffusers.__version__
    try:
        verified = Version(installed) in VERIFIED_DIFFUSERS
    except InvalidVersion:
        verified = False
    if verified:
        return installed
    what = (
        f"leapkernels' patched block forwards are copies of diffusers' code verified against diffusers "
        f"{VERIFIED_DIFFUSERS}, but diffusers {installed} is installed: if its blocks changed, the patched "
        "model computes something else, silently"
    )
    if not allow_unverified:
        raise UnverifiedDiffusersError(
            f"{what}. Install diffusers{VERIFIED_DIFFUSERS}, or pass allow_unverified_diffusers=True to patch anyway "
            "(then run tests/kernels/test_*_patch.py against this diffusers)"
        )
    warnings.warn(f"{what}; patching anyway (allow_unverified_diffusers=True)", UserWarning, stacklevel=3)
    return installed


# ----------------------------------------------------------------------------- apply / revert bookkeeping
def swap_forward(module: nn.Module, forward: Callable, options: object) -> None:
    """Give ``module`` an instance ``forward`` (never its class's) and its switches."""
    setattr(module, OPTIONS, options)
    module.forward = types.MethodType(forward, module)


def swap_processor(attn: nn.Module, processor: object) -> None:
    """Give ``attn`` ``processor``, keeping the original's attention backend and the original itself."""
    original = attn.processor
    processor._attention_backend = getattr(original, "_attention_backend", None)
    processor._parallel_config = getattr(original, "_parallel_config", None)
    setattr(attn, ORIGINAL_PROCESSOR, original)
    attn.processor = processor


def restore(modules) -> None:
    """Undo `swap_forward` / `swap_processor` on every module given (bit-exact: nothing else changed)."""
    for module in modules:
        if hasattr(module, OPTIONS):
            delattr(module, OPTIONS)
            module.__dict__.pop("forward", None)
        if hasattr(module, ORIGINAL_PROCESSOR):
            module.processor = getattr(module, ORIGINAL_PROCESSOR)
            delattr(module, ORIGINAL_PROCESSOR)


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a patch's switches."""
    return any(hasattr(m, OPTIONS) for m in model.modules())


# ----------------------------------------------------------------------------- block pieces
def per_sample(t: torch.Tensor) -> torch.Tensor:
    """A modulation chunk as ``[B, D]`` rows where it is one per sample (``[B, D]`` or ``[B, 1, D]``),
    else unchanged (``[B, S, D]``: per token; the fused ops then step aside)."""
    return t[:, 0] if t.dim() == 3 and t.shape[1] == 1 else t


def _bcast(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 2 else t


def modulate(fused: bool, norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` (affine-free LayerNorm), fused where the inputs allow."""
    if fused and scale.dim() == 2 and shift.dim() == 2 and same_dtype_device(x, scale, shift):
        return modulated_layernorm(x, scale, shift, norm.eps)
    return norm(x) * (1 + _bcast(scale)) + _bcast(shift)


def gate(fused: bool, x: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + g * y`` (AdaLN-Zero gate), fused where the inputs allow."""
    if fused and g.dim() == 2 and same_dtype_device(x, g, y) and x.shape == y.shape:
        return gated_residual(x, g, y)
    return x + _bcast(g) * y


def _inactive(dropout: nn.Module | None) -> bool:
    return dropout is None or not dropout.training or dropout.p == 0


def activation(name: str | None, fused: bool, x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU (``"gelu"``) or SwiGLU (``"swiglu"``) of ``x``: the fused op, or diffusers' arithmetic."""
    if name == "gelu":
        return gelu_tanh(x) if fused else F.gelu(x, approximate="tanh")
    if name == "swiglu":
        return swiglu(x) if fused else swiglu_reference(x)
    return x


def branch_out(
    fuse_gate: bool, fuse_act: bool, residual: torch.Tensor, g: torch.Tensor, x: torch.Tensor, linear: nn.Module, *,
    act: str | None = None, prefix: torch.Tensor | None = None, dropout: nn.Module | None = None,
    dropout_after: nn.Module | None = None,
) -> torch.Tensor:
    """``residual + g * dropout_after(linear(cat([prefix, dropout(act(x))])))``, as fused as allowed.

    Plain Linear + gate fusion on: one Function saving neither the activation nor the projection
    (`gated_linear` / `gated_swiglu_linear`). Otherwise activation + projection in one Function
    (`gelu_linear` / `swiglu_linear`), else module calls; then the gate.
    """
    operands = (x, linear.weight) + ((prefix,) if prefix is not None else ())
    fusable = plain_linear(linear) and _inactive(dropout) and _inactive(dropout_after) and same_dtype_device(*operands)
    if fuse_gate and fusable and g.dim() == 2 and same_dtype_device(residual, g, x) and residual.shape[:2] == x.shape[:2]:
        if act is not None and not fuse_act:
            x, act = activation(act, False, x), None
        if act == "swiglu":
            return gated_swiglu_linear(residual, g, x, linear.weight, linear.bias, prefix)
        return gated_linear(residual, g, x, linear.weight, linear.bias, prefix, act == "gelu")
    if act is not None and fuse_act and fusable:
        y = (gelu_linear if act == "gelu" else swiglu_linear)(x, linear.weight, linear.bias, prefix)
    else:
        a = activation(act, fuse_act, x)
        if dropout is not None:
            a = dropout(a)
        if prefix is not None:
            a = torch.cat([prefix, a], dim=-1)
        y = linear(a.contiguous())
        if dropout_after is not None:
            y = dropout_after(y)
    return gate(fuse_gate, residual, g, y)


def mlp_residual(fuse_gate: bool, fuse_act: bool, residual: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                 linear_in: nn.Module, linear_out: nn.Module, act: str, *, dropout: nn.Module | None = None,
                 prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + g * linear_out(cat([prefix, dropout(act(linear_in(x)))]))``. Both projections plain
    and both switches on: one `gated_mlp` saving only ``x``; otherwise ``linear_in`` is called and
    the rest closed by `branch_out` (which saves the pre-activation)."""
    operands = (residual, g, x, linear_in.weight, linear_out.weight) + ((prefix,) if prefix is not None else ())
    if (fuse_gate and fuse_act and plain_linear(linear_in) and plain_linear(linear_out) and _inactive(dropout)
            and g.dim() == 2 and same_dtype_device(*operands) and residual.shape[:2] == x.shape[:2]):
        return gated_mlp(residual, g, x, linear_in.weight, linear_in.bias, linear_out.weight, linear_out.bias, prefix, act)
    return branch_out(fuse_gate, fuse_act, residual, g, linear_in(x), linear_out, act=act, prefix=prefix, dropout=dropout)


def gelu_feed_forward_residual(fuse_gate: bool, fuse_act: bool, ff: nn.Module, residual: torch.Tensor, g: torch.Tensor,
                               x: torch.Tensor, whole: bool = False) -> torch.Tensor:
    """``residual + g * FeedForward(x)`` for diffusers' tanh-GELU FeedForward (FLUX.1, SD3)
    (net = [GELU(proj), Dropout, Linear] + optional extras, which are then called as modules).
    ``whole``: the up projection joins the fusion too (`mlp_residual`: only ``x`` is saved)."""
    net = ff.net
    if len(net) == 3 and whole:
        return mlp_residual(fuse_gate, fuse_act, residual, g, x, net[0].proj, net[2], "gelu", dropout=net[1])
    h = net[0].proj(x)
    if len(net) == 3:
        return branch_out(fuse_gate, fuse_act, residual, g, h, net[2], act="gelu", dropout=net[1])
    out = net[2](net[1](activation("gelu", fuse_act, h)))
    for module in net[3:]:
        out = module(out)
    return gate(fuse_gate, residual, g, out)


def ada_continuous_forward(self: nn.Module, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous.forward (LayerNorm, no affine): chunk order (scale, shift)."""
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    if same_dtype_device(x, emb):
        return ada_layernorm_continuous(x, emb, self.norm.eps)
    scale, shift = torch.chunk(emb, 2, dim=1)
    return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


def check_ada_continuous(module: nn.Module, where: str) -> None:
    """Raise unless ``module`` is an AdaLayerNormContinuous over an affine-free LayerNorm."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    if not isinstance(module, AdaLayerNormContinuous) or not isinstance(module.norm, nn.LayerNorm) \
            or module.norm.weight is not None:
        raise NotImplementedError(f"{where} is not an affine-free LayerNorm AdaLayerNormContinuous")


def check_affine_free_layernorm(norm: nn.Module, where: str) -> None:
    """Raise unless ``norm`` is an ``nn.LayerNorm`` without weight or bias (what modulate fuses)."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is not None:
        raise NotImplementedError(f"{where} is not an affine-free LayerNorm")

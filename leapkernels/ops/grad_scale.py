"""Per-term gradient magnitude scaling: identity forward, ``alpha``-scaled (optionally norm-capped) backward.

    forward:  y = x                        (a view; no copy, nothing saved)
    backward: dx_b = alpha_b * g_b * min(1, max_norm / ||alpha_b * g_b||)   per sample b

With ``max_norm=None`` the cap is off and this is LeapAlign's discount ``alpha x + (1 - alpha)
sg(x)`` (DESIGN §2 step 4) without materialising either term. The cap is a soft alternative
to dropping a term whose gradient explodes: the sample's gradient keeps its direction and gets
at most ``max_norm`` in L2 norm. One reduction kernel (per-program partial sums of squares) and
one scale kernel that reduces the partials itself; the only full-size buffer is the gradient.
"""
from __future__ import annotations

import torch

from leapkernels import backend
from leapkernels.checks import as_rows, check_tensor, per_sample
from leapkernels.ops._common import (
    acc_tl, compiling, launch_options, needs_autograd, no_forward, register_op, stream_launch, tl, triton,
)
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "grad_scale"


# ----------------------------------------------------------------------------- reference (autograd)
def grad_scale_reference(x: torch.Tensor, alpha: float | torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Plain PyTorch: scale each sample's gradient by ``alpha``, cap its norm; via a backward hook."""
    y = x.view_as(x)
    a = alpha.reshape(-1, *([1] * (x.dim() - 1))) if isinstance(alpha, torch.Tensor) else alpha

    def hook(g: torch.Tensor) -> torch.Tensor:
        scaled = g * a
        if max_norm is None:
            return scaled
        norm = scaled.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
        return scaled * torch.clamp(max_norm / norm, max=1.0).nan_to_num(1.0)

    if y.requires_grad:
        y.register_hook(hook)
    return y


# ----------------------------------------------------------------------------- kernels (contract)
# backward(g[B,N], alpha[B] acc, max_norm: float | None) -> grad_x[B,N] in g's dtype
# (there is no forward kernel: the forward is a view)


def _backward_reference(g, alpha, max_norm):
    acc = backend.accumulator_dtype(g.dtype)
    scaled = g.to(acc) * alpha[:, None]
    if max_norm is not None:
        norm = scaled.norm(dim=1)
        factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
        scaled = scaled * factor[:, None]
    return scaled.to(g.dtype)


if triton is not None:

    @triton.jit
    def _sumsq_kernel(g_ptr, part_ptr, N, stride_g, n_progs, BLOCK: tl.constexpr, ACC: tl.constexpr):
        """This program's partial sum of g^2 over its slices of sample b's row."""
        b = tl.program_id(0).to(tl.int64)  # a 64-bit loop counter: offsets past 2**31 must not wrap
        p = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            offs = tl.arange(0, BLOCK) + start
            g = tl.load(g_ptr + b * stride_g + offs, mask=offs < N, other=0.0).to(ACC)
            acc += g * g
        tl.store(part_ptr + b * n_progs + p, tl.sum(acc, 0))

    @triton.jit
    def _scale_kernel(
        g_ptr, alpha_ptr, part_ptr, out_ptr, N, stride_g, n_progs, max_norm,
        HAS_CAP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """out = factor g, factor = alpha (capped from the summed partials when HAS_CAP)."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        factor = tl.load(alpha_ptr + b).to(ACC)
        if HAS_CAP:
            pcols = tl.arange(0, BLOCK_P)
            sumsq = tl.sum(tl.load(part_ptr + b * n_progs + pcols, mask=pcols < n_progs, other=0.0), 0)
            norm = tl.abs(factor) * tl.sqrt(sumsq)
            factor = tl.where(norm > max_norm, factor * (max_norm / norm), factor)
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            offs = tl.arange(0, BLOCK) + start
            mask = offs < N
            g = tl.load(g_ptr + b * stride_g + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + b * N + offs, rounded(g * factor, out_ptr.dtype.element_ty, RTNE), mask=mask)


def _backward_triton(g, alpha, max_norm):
    batch, n = g.shape
    block, n_progs, warps = stream_launch(batch, n, g.device)
    out = backend.empty((batch, n), dtype=g.dtype, device=g.device)
    part = backend.empty((batch, n_progs), dtype=backend.accumulator_dtype(g.dtype), device=g.device)
    if max_norm is not None:
        _sumsq_kernel[(batch, n_progs)](
            g, part, n, g.stride(0), n_progs, BLOCK=block, ACC=acc_tl(g.dtype), **launch_options(warps),
        )
    _scale_kernel[(batch, n_progs)](
        g, alpha, part, out, n, g.stride(0), n_progs, float(max_norm or 0.0),
        HAS_CAP=max_norm is not None, BLOCK=block, BLOCK_P=triton.next_power_of_2(n_progs), ACC=acc_tl(g.dtype),
        RTNE=emulate_bf16_rtne(g.dtype, g.device), **launch_options(warps),
    )
    return out


register_op(OP, (no_forward(OP), _backward_reference), (no_forward(OP), _backward_triton))


# ----------------------------------------------------------------------------- autograd
class GradScaleFunction(torch.autograd.Function):
    """Identity forward (a view, nothing saved); backward scales and caps per sample."""

    @staticmethod
    def forward(ctx, x, alpha, max_norm):
        ctx.alpha = per_sample("alpha", alpha, x.shape[0], x.device, backend.accumulator_dtype(x.dtype))
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        kernels = backend.kernels_for(OP, grad_out.device)
        grad = kernels.backward(as_rows(grad_out), ctx.alpha, ctx.max_norm)
        return grad.view(grad_out.shape), None, None


def grad_scale(x: torch.Tensor, alpha: float | torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Identity in value; the gradient reaching ``x`` is ``alpha`` times the incoming one, per sample.

    ``x``: ``[B, ...]``. ``alpha``: a float, a 0-d tensor, or ``[B]`` (no gradient flows to it).
    ``max_norm``: if given (> 0), each sample's scaled gradient is rescaled to at most this L2
    norm. Arithmetic in fp32 (fp64 for fp64 inputs); the gradient keeps ``x``'s dtype.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if isinstance(alpha, torch.Tensor):
        if not (alpha.numel() == 1 and alpha.dim() <= 1) and tuple(alpha.shape) != (x.shape[0],):
            raise ValueError(f"alpha must be a scalar or have shape ({x.shape[0]},), got {tuple(alpha.shape)}")
        if alpha.device != x.device and alpha.numel() != 1:
            raise ValueError(f"alpha is on {alpha.device} but x is on {x.device}; expected the same device")
    elif not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive float or None, got {max_norm!r}")
    max_norm = None if max_norm is None else float(max_norm)
    if compiling():
        return grad_scale_reference(x, alpha, max_norm)
    if not needs_autograd(x):
        return x.view_as(x)  # the identity forward; nothing to scale without a backward
    return GradScaleFunction.apply(x, alpha, max_norm)

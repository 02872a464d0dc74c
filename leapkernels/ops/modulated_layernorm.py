"""LayerNorm (no affine) + AdaLN modulation in one pass; backward recomputes the statistics.

    y = LayerNorm(x; eps) * (1 + scale[b]) + shift[b]        x: [B, S, D], scale/shift: [B, D]

Flux uses it in every block (AdaLayerNormZero: chunks shift, scale, gate; AdaLayerNormZeroSingle;
the MLP-side ``norm2`` + modulation of the double blocks) and in the final
AdaLayerNormContinuous (chunk order **scale, shift**: `ada_layernorm_continuous`).

Saved for backward: ``x`` and ``scale`` only (eager saves x, the normalised x, mean, rstd and
the modulated copy). Backward recomputes mean/rstd per row and writes ``dx``; ``dscale`` and
``dshift`` (sums over tokens) are per-program fp32 partials summed after the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leapkernels import backend
from leapkernels.checks import check_shape, check_tensor, unit_last_stride
from leapkernels.ops._common import acc_tl, register_op, row_launch, tl, triton
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "modulated_layernorm"


# ----------------------------------------------------------------------------- reference (autograd)
def modulated_layernorm_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """diffusers' own arithmetic: ``norm(x) * (1 + scale[:, None]) + shift[:, None]``."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- kernels (contract)
# forward(x[B,S,D] (unit last stride), scale[B,D], shift[B,D], eps) -> y[B,S,D] contiguous
# backward(g[B,S,D], x, scale, eps, need_dx, need_dmod) -> (dx | None, dscale[B,D] | None, dshift[B,D] | None)


def _stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    acc = backend.accumulator_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    xhat = xf - mean
    rstd = torch.rsqrt(xhat.pow(2).mean(-1, keepdim=True) + eps)
    return xhat * rstd, rstd


def _forward_reference(x, scale, shift, eps):
    acc = backend.accumulator_dtype(x.dtype)
    xhat, _ = _stats(x, eps)
    return (xhat * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]).to(x.dtype)


def _backward_reference(g, x, scale, eps, need_dx, need_dmod):
    acc = backend.accumulator_dtype(x.dtype)
    xhat, rstd = _stats(x, eps)
    gf = g.to(acc)
    dx = dscale = dshift = None
    if need_dx:
        dxhat = gf * (1 + scale.to(acc)[:, None])
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dx = dx.to(x.dtype)
    if need_dmod:
        dscale = (gf * xhat).sum(1).to(scale.dtype)
        dshift = gf.sum(1).to(scale.dtype)
    return dx, dscale, dshift


if triton is not None:

    @triton.jit
    def _mln_fwd_kernel(
        x_ptr, scale_ptr, shift_ptr, y_ptr,
        S, D, stride_xb, stride_xs, stride_sc, stride_sh, eps, n_progs,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: no int32 overflow (nor interpreter checks)
        p = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        one_plus_scale = 1.0 + tl.load(scale_ptr + b * stride_sc + cols, mask=cmask, other=0.0).to(ACC)
        shift = tl.load(shift_ptr + b * stride_sh + cols, mask=cmask, other=0.0).to(ACC)
        for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R).to(tl.int64) + start
            mask = (rows < S)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xs + cols[None, :], mask=mask, other=0.0).to(ACC)
            mean = tl.sum(x, 1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
            y = xc * rstd[:, None] * one_plus_scale[None, :] + shift[None, :]
            tl.store(y_ptr + (b * S + rows[:, None]) * D + cols[None, :], rounded(y, y_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _mln_bwd_kernel(
        g_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr, dshift_ptr,
        S, D, stride_gb, stride_gs, stride_xb, stride_xs, stride_sc, eps, n_progs,
        NEED_DX: tl.constexpr, NEED_DMOD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: no int32 overflow (nor interpreter checks)
        p = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        one_plus_scale = 1.0 + tl.load(scale_ptr + b * stride_sc + cols, mask=cmask, other=0.0).to(ACC)
        dscale = tl.zeros([BLOCK_D], dtype=ACC)
        dshift = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R).to(tl.int64) + start
            mask = (rows < S)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xs + cols[None, :], mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + b * stride_gb + rows[:, None] * stride_gs + cols[None, :], mask=mask, other=0.0).to(ACC)
            mean = tl.sum(x, 1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
            xhat = xc * rstd[:, None]
            if NEED_DMOD:
                dscale += tl.sum(g * xhat, 0)
                dshift += tl.sum(g, 0)
            if NEED_DX:
                dxhat = g * one_plus_scale[None, :]
                c1 = tl.sum(dxhat, 1) / D
                c2 = tl.sum(dxhat * xhat, 1) / D
                dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + (b * S + rows[:, None]) * D + cols[None, :], rounded(dx, dx_ptr.dtype.element_ty, RTNE), mask=mask)
        if NEED_DMOD:
            tl.store(dscale_ptr + (b * n_progs + p) * D + cols, dscale, mask=cmask)
            tl.store(dshift_ptr + (b * n_progs + p) * D + cols, dshift, mask=cmask)


def _forward_triton(x, scale, shift, eps):
    batch, seq, dim = x.shape
    block_r, block_d, n_progs = row_launch(batch, seq, dim, x.device)
    y = backend.empty((batch, seq, dim), dtype=x.dtype, device=x.device)
    _mln_fwd_kernel[(batch, n_progs)](
        x, scale, shift, y, seq, dim, x.stride(0), x.stride(1), scale.stride(0), shift.stride(0), eps, n_progs,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        num_warps=backend.num_warps(block_r * block_d),
    )
    return y


def _backward_triton(g, x, scale, eps, need_dx, need_dmod):
    batch, seq, dim = x.shape
    block_r, block_d, n_progs = row_launch(batch, seq, dim, x.device)
    acc = backend.accumulator_dtype(x.dtype)
    dx = backend.empty((batch, seq, dim), dtype=x.dtype, device=x.device) if need_dx else x
    shape = (batch, n_progs, dim) if need_dmod else (1,)
    dscale, dshift = (backend.empty(shape, dtype=acc, device=x.device) for _ in range(2))
    _mln_bwd_kernel[(batch, n_progs)](
        g, x, scale, dx, dscale, dshift, seq, dim, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        scale.stride(0), eps, n_progs, NEED_DX=need_dx, NEED_DMOD=need_dmod,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        num_warps=backend.num_warps(block_r * block_d),
    )
    if not need_dmod:
        return (dx if need_dx else None), None, None
    return (dx if need_dx else None), dscale.sum(1).to(scale.dtype), dshift.sum(1).to(scale.dtype)


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


# ----------------------------------------------------------------------------- autograd

class ModulatedLayerNormFunction(torch.autograd.Function):
    """Saves x and scale; backward recomputes mean and rstd."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        x, scale, shift = unit_last_stride(x), unit_last_stride(scale), unit_last_stride(shift)
        y = backend.kernels_for(OP, x.device).forward(x, scale, shift, eps)
        ctx.save_for_backward(x, scale)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        x, scale = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dmod = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dscale, dshift = backend.kernels_for(OP, g.device).backward(
            unit_last_stride(g), x, scale, ctx.eps, need_dx, need_dmod
        )
        return dx, dscale, dshift, None


def modulated_layernorm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` fused; gradients for all three.

    ``x``: ``[B, S, D]``; ``scale``, ``shift``: ``[B, D]`` (views such as ``emb.chunk(...)`` are
    fine), same dtype and device as ``x``. Arithmetic in fp32; output in ``x``'s dtype.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("scale", scale, like=x, like_name="x", ndim=2)
    check_tensor("shift", shift, like=x, like_name="x", ndim=2)
    check_shape("scale", scale, (x.shape[0], x.shape[2]), "(batch, features) of x")
    check_shape("shift", shift, (x.shape[0], x.shape[2]), "(batch, features) of x")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return ModulatedLayerNormFunction.apply(x, scale, shift, float(eps))


def ada_layernorm_continuous(x: torch.Tensor, emb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous after its linear: ``emb`` chunks as (scale, shift)."""
    check_tensor("emb", emb, like=x, like_name="x", ndim=2)
    if emb.shape[1] != 2 * x.shape[-1]:
        raise ValueError(f"emb must have shape ({x.shape[0]}, {2 * x.shape[-1]}) (scale, shift), got {tuple(emb.shape)}")
    scale, shift = emb.chunk(2, dim=1)
    return modulated_layernorm(x, scale, shift, eps)


def ada_layernorm_continuous_reference(x: torch.Tensor, emb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    scale, shift = emb.chunk(2, dim=1)
    return modulated_layernorm_reference(x, scale, shift, eps)

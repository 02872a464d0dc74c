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
from leapkernels.ops._common import (
    acc_tl, compiling, device_fn, launch_options, needs_autograd, register_op, row_launch, tl, triton,
)
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

    @device_fn
    def _load_chunk(ptr, row_offs, rmask, c0, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Columns ``[c0, c0 + BLOCK_D)`` of rows starting at ``row_offs``, in ACC (0 outside)."""
        cols = tl.arange(0, BLOCK_D) + c0
        mask = rmask[:, None] & (cols < D)[None, :]
        return tl.load(ptr + row_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC), cols, mask

    @device_fn
    def _row_moments(x_ptr, row_offs, rmask, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Mean and 1/sqrt(var + eps) of each row, one pass over column chunks: each chunk's mean
        and centred sum of squares, merged into the running ones (Chan et al.; exact two-pass
        statistics when the row is one chunk)."""
        mean = tl.zeros([BLOCK_R], dtype=ACC)
        m2 = tl.zeros([BLOCK_R], dtype=ACC)
        count = tl.zeros([BLOCK_R], dtype=ACC)
        for c0 in range(0, D, BLOCK_D):
            x, cols, mask = _load_chunk(x_ptr, row_offs, rmask, c0, D, BLOCK_D, ACC)
            n_c = tl.sum((cols < D).to(ACC), 0)
            c_mean = tl.sum(x, 1) / n_c
            xc = tl.where(mask, x - c_mean[:, None], 0.0)
            total = count + n_c
            delta = c_mean - mean
            mean += delta * (n_c / total)
            m2 += tl.sum(xc * xc, 1) + delta * delta * (count * n_c / total)
            count = total
        return mean, 1.0 / tl.sqrt(m2 / D + eps)

    @triton.jit
    def _mln_fwd_kernel(
        x_ptr, scale_ptr, shift_ptr, y_ptr,
        S, D, stride_xb, stride_xs, stride_sc, stride_sh, eps, n_progs,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # int64 offsets and row counters: no int32 overflow
        p = tl.program_id(1).to(tl.int64)
        for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R) + start
            rmask = rows < S
            x_offs = b * stride_xb + rows * stride_xs
            mean, rstd = _row_moments(x_ptr, x_offs, rmask, D, eps, BLOCK_R, BLOCK_D, ACC)
            for c0 in range(0, D, BLOCK_D):
                x, cols, mask = _load_chunk(x_ptr, x_offs, rmask, c0, D, BLOCK_D, ACC)
                cmask = cols < D
                one_plus_scale = 1.0 + tl.load(scale_ptr + b * stride_sc + cols, mask=cmask, other=0.0).to(ACC)
                shift = tl.load(shift_ptr + b * stride_sh + cols, mask=cmask, other=0.0).to(ACC)
                y = (x - mean[:, None]) * rstd[:, None] * one_plus_scale[None, :] + shift[None, :]
                y_offs = (b * S + rows)[:, None] * D + cols[None, :]
                tl.store(y_ptr + y_offs, rounded(y, y_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _mln_bwd_kernel(
        g_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr, dshift_ptr,
        S, D, stride_gb, stride_gs, stride_xb, stride_xs, stride_sc, eps, n_progs,
        NEED_DX: tl.constexpr, NEED_DMOD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """dx; and this program's partial d-scale / d-shift per column, accumulated in place
        (the launcher zeroes them; each program owns its slice, so no atomics; a barrier after each
        row tile orders one tile's stores before the next tile's loads across the block's threads)."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        part = (b * n_progs + p) * D
        for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R) + start
            rmask = rows < S
            x_offs, g_offs = b * stride_xb + rows * stride_xs, b * stride_gb + rows * stride_gs
            mean, rstd = _row_moments(x_ptr, x_offs, rmask, D, eps, BLOCK_R, BLOCK_D, ACC)
            c1 = tl.zeros([BLOCK_R], dtype=ACC)  # mean of dxhat and of dxhat * xhat, per row
            c2 = tl.zeros([BLOCK_R], dtype=ACC)
            if NEED_DX:
                for c0 in range(0, D, BLOCK_D):
                    x, cols, mask = _load_chunk(x_ptr, x_offs, rmask, c0, D, BLOCK_D, ACC)
                    g, _, _ = _load_chunk(g_ptr, g_offs, rmask, c0, D, BLOCK_D, ACC)
                    sc = 1.0 + tl.load(scale_ptr + b * stride_sc + cols, mask=cols < D, other=0.0).to(ACC)
                    dxhat = g * sc[None, :]
                    c1 += tl.sum(dxhat, 1) / D
                    c2 += tl.sum(dxhat * tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), 1) / D
            for c0 in range(0, D, BLOCK_D):
                x, cols, mask = _load_chunk(x_ptr, x_offs, rmask, c0, D, BLOCK_D, ACC)
                g, _, _ = _load_chunk(g_ptr, g_offs, rmask, c0, D, BLOCK_D, ACC)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                cmask = cols < D
                if NEED_DX:
                    dxhat = g * (1.0 + tl.load(scale_ptr + b * stride_sc + cols, mask=cmask, other=0.0).to(ACC))[None, :]
                    dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                    dx_offs = (b * S + rows)[:, None] * D + cols[None, :]
                    tl.store(dx_ptr + dx_offs, rounded(dx, dx_ptr.dtype.element_ty, RTNE), mask=mask)
                if NEED_DMOD:
                    dscale = tl.load(dscale_ptr + part + cols, mask=cmask, other=0.0) + tl.sum(g * xhat, 0)
                    tl.store(dscale_ptr + part + cols, dscale, mask=cmask)
                    dshift = tl.load(dshift_ptr + part + cols, mask=cmask, other=0.0) + tl.sum(g, 0)
                    tl.store(dshift_ptr + part + cols, dshift, mask=cmask)
            if NEED_DMOD:  # the next row tile re-reads the partials, maybe in other threads: make them visible
                tl.debug_barrier()


def _forward_triton(x, scale, shift, eps):
    batch, seq, dim = x.shape
    block_r, block_d, n_progs, warps = row_launch(batch, seq, dim, x.device)
    y = backend.empty((batch, seq, dim), dtype=x.dtype, device=x.device)
    _mln_fwd_kernel[(batch, n_progs)](
        x, scale, shift, y, seq, dim, x.stride(0), x.stride(1), scale.stride(0), shift.stride(0), eps, n_progs,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        **launch_options(warps),
    )
    return y


def _backward_triton(g, x, scale, eps, need_dx, need_dmod):
    batch, seq, dim = x.shape
    block_r, block_d, n_progs, warps = row_launch(batch, seq, dim, x.device)
    acc = backend.accumulator_dtype(x.dtype)
    dx = backend.empty((batch, seq, dim), dtype=x.dtype, device=x.device) if need_dx else x
    shape = (batch, n_progs, dim) if need_dmod else (1,)
    dscale, dshift = (torch.zeros(shape, dtype=acc, device=x.device) for _ in range(2))  # accumulated in place
    _mln_bwd_kernel[(batch, n_progs)](
        g, x, scale, dx, dscale, dshift, seq, dim, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        scale.stride(0), eps, n_progs, NEED_DX=need_dx, NEED_DMOD=need_dmod,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        **launch_options(warps),
    )
    if not need_dmod:
        return (dx if need_dx else None), None, None
    return (dx if need_dx else None), dscale.sum(1).to(scale.dtype), dshift.sum(1).to(scale.dtype)


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


# ----------------------------------------------------------------------------- autograd

def _forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward kernel on unit-last-stride operands (the Function and the no-grad path share it)."""
    x, scale, shift = unit_last_stride(x), unit_last_stride(scale), unit_last_stride(shift)
    return backend.kernels_for(OP, x.device).forward(x, scale, shift, eps)


class ModulatedLayerNormFunction(torch.autograd.Function):
    """Saves x and scale; backward recomputes mean and rstd."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        x, scale = unit_last_stride(x), unit_last_stride(scale)
        y = _forward(x, scale, shift, eps)
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
    if compiling():
        return modulated_layernorm_reference(x, scale, shift, eps)
    if not needs_autograd(x, scale, shift):
        return _forward(x, scale, shift, float(eps))
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

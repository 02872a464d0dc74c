"""Per-head RMSNorm (learnable weight) + interleaved rotary embedding, one pass (Flux's q/k path).

    n   = x * rsqrt(mean(x^2) + eps) * weight                  x: [B, S, H, Dh], weight: [Dh]
    out = n * cos + rotate(n) * sin,  rotate(n)[2i] = -n[2i+1], rotate(n)[2i+1] = n[2i]

``cos``/``sin``: ``[S, Dh]`` fp32 as diffusers' FluxPosEmbed gives them (``repeat_interleave_real``)
and ``apply_rotary_emb(..., use_real_unbind_dim=-1)`` uses them. ``cos=sin=None``: RMSNorm only.

Saved for backward: ``x`` and ``weight`` (eager keeps fp32 copies of x, the normalised x, the
rotated copy and the products: ~7x the bytes of x). Backward un-rotates the gradient, recomputes
rstd and writes ``dx``; ``dweight`` is per-program fp32 partials summed after.
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

OP = "qk_norm_rope"


def qk_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """diffusers' arithmetic: ``torch.nn.RMSNorm`` then ``apply_rotary_emb(sequence_dim=1)``."""
    n = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if cos is None:
        return n
    real, imag = n.reshape(*n.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (n.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(n.dtype)


# ----------------------------------------------------------------------------- kernels (contract)
# forward(x[B,S,H,Dh] (unit last stride), weight[Dh], cos[S,Dh] | None, sin | None, eps) -> out contiguous
# backward(g, x, weight, cos, sin, eps, need_dx, need_dw) -> (dx | None, dweight[Dh] | None)


def _rotate(t: torch.Tensor) -> torch.Tensor:
    real, imag = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-imag, real], dim=-1).flatten(-2)


def _forward_reference(x, weight, cos, sin, eps):
    acc = backend.accumulator_dtype(x.dtype)
    xf = x.to(acc)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    if cos is not None:
        c, s = cos.to(acc)[None, :, None, :], sin.to(acc)[None, :, None, :]
        n = n * c + _rotate(n) * s
    return n.to(x.dtype)


def _backward_reference(g, x, weight, cos, sin, eps, need_dx, need_dw):
    acc = backend.accumulator_dtype(x.dtype)
    xf, gn = x.to(acc), g.to(acc)
    if cos is not None:
        # out = n c + R(n) s  =>  dn = g c + R^T(g s),  R^T = -R
        c, s = cos.to(acc)[None, :, None, :], sin.to(acc)[None, :, None, :]
        gn = gn * c - _rotate(gn * s)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dx = dw = None
    if need_dw:
        dw = (gn * xhat).flatten(0, -2).sum(0).to(weight.dtype)
    if need_dx:
        dxhat = gn * weight.to(acc)
        dx = (rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
    return dx, dw


if triton is not None:

    @device_fn
    def _rotate_pairs(t, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
        """Interleaved rotation of each row's pairs, on a contiguous tile (no stride-2 access):
        R t = (-t1, t0, -t3, t2, ...);  R^T t = (t1, -t0, t3, -t2, ...)."""
        even, odd = tl.split(tl.reshape(t, [BLOCK_R, BLOCK_D // 2, 2]))
        pairs = tl.join(odd, -even) if TRANSPOSE else tl.join(-odd, even)
        return tl.reshape(pairs, [BLOCK_R, BLOCK_D])

    @device_fn
    def _head_rows(start, R, S, H, SH, BLOCK_R: tl.constexpr):
        """Rows ``start ..`` of the flattened ``[B * S * H]`` heads: (rows, mask, batch, seq, head)."""
        rows = tl.arange(0, BLOCK_R) + start
        return rows, rows < R, rows // SH, (rows // H) % S, rows % H

    @triton.jit
    def _qkr_fwd_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
        R, S, H, SH, D, stride_xb, stride_xs, stride_xh, stride_cs, eps, n_progs,
        HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        p = tl.program_id(0).to(tl.int64)  # int64 offsets and row counters throughout
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        for start in range(p * BLOCK_R, R, n_progs * BLOCK_R):
            rows, rmask, b, s, h = _head_rows(start, R, S, H, SH, BLOCK_R)
            mask = rmask[:, None] & cmask[None, :]
            x_offs = (b * stride_xb + s * stride_xs + h * stride_xh)[:, None] + cols[None, :]
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            out = x * rstd[:, None] * w[None, :]
            if HAS_ROPE:
                rope_offs = (s * stride_cs)[:, None] + cols[None, :]
                cos = tl.load(cos_ptr + rope_offs, mask=mask, other=0.0).to(ACC)
                sin = tl.load(sin_ptr + rope_offs, mask=mask, other=0.0).to(ACC)
                out = out * cos + _rotate_pairs(out, BLOCK_R, BLOCK_D, False) * sin
            tl.store(out_ptr + (rows * D)[:, None] + cols[None, :], rounded(out, out_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _qkr_bwd_kernel(
        g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, dx_ptr, dw_ptr,
        R, S, H, SH, D, stride_gb, stride_gs, stride_gh, stride_xb, stride_xs, stride_xh, stride_cs, eps, n_progs,
        HAS_ROPE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """Un-rotates g (dn = g cos + R^T(g sin)), recomputes rstd; dx, and this program's d-weight."""
        p = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(p * BLOCK_R, R, n_progs * BLOCK_R):
            rows, rmask, b, s, h = _head_rows(start, R, S, H, SH, BLOCK_R)
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + (b * stride_xb + s * stride_xs + h * stride_xh)[:, None] + cols[None, :], mask=mask, other=0.0)
            dn = tl.load(g_ptr + (b * stride_gb + s * stride_gs + h * stride_gh)[:, None] + cols[None, :], mask=mask, other=0.0)
            x, dn = x.to(ACC), dn.to(ACC)
            if HAS_ROPE:
                rope_offs = (s * stride_cs)[:, None] + cols[None, :]
                cos = tl.load(cos_ptr + rope_offs, mask=mask, other=0.0).to(ACC)
                sin = tl.load(sin_ptr + rope_offs, mask=mask, other=0.0).to(ACC)
                dn = dn * cos + _rotate_pairs(dn * sin, BLOCK_R, BLOCK_D, True)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
            xhat = x * rstd[:, None]
            if NEED_DW:
                dw += tl.sum(dn * xhat, 0)
            if NEED_DX:
                dxhat = dn * w[None, :]
                c = tl.sum(dxhat * xhat, 1) / D
                dx = (dxhat - xhat * c[:, None]) * rstd[:, None]
                tl.store(dx_ptr + (rows * D)[:, None] + cols[None, :], rounded(dx, dx_ptr.dtype.element_ty, RTNE), mask=mask)
        if NEED_DW:
            tl.store(dw_ptr + p * D + cols, dw, mask=cmask)


def _rope_args(cos, sin, fallback):
    """Kernel arguments for the tables (a valid pointer and stride 0 when RoPE is off)."""
    return (cos, sin, cos.stride(0)) if cos is not None else (fallback, fallback, 0)


def _forward_triton(x, weight, cos, sin, eps):
    batch, seq, heads, dim = x.shape
    rows = batch * seq * heads
    block_r, block_d, n_progs, warps = row_launch(1, rows, dim, x.device, cap=False)
    out = backend.empty(x.shape, dtype=x.dtype, device=x.device)
    cos_, sin_, stride_cs = _rope_args(cos, sin, weight)
    _qkr_fwd_kernel[(n_progs,)](
        x, weight, cos_, sin_, out,
        rows, seq, heads, seq * heads, dim, x.stride(0), x.stride(1), x.stride(2), stride_cs, eps, n_progs,
        HAS_ROPE=cos is not None, BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype),
        RTNE=emulate_bf16_rtne(x.dtype, x.device), **launch_options(warps),
    )
    return out


def _backward_triton(g, x, weight, cos, sin, eps, need_dx, need_dw):
    batch, seq, heads, dim = x.shape
    rows = batch * seq * heads
    # half tiles: backward holds x, g, cos, sin and their rotations at once (fp32 spilled at full tiles)
    block_r, block_d, n_progs, warps = row_launch(1, rows, dim, x.device, cap=False, tile_fraction=2)
    dx = backend.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else x
    dw = backend.empty((n_progs, dim) if need_dw else (1,), dtype=backend.accumulator_dtype(x.dtype), device=x.device)
    cos_, sin_, stride_cs = _rope_args(cos, sin, weight)
    _qkr_bwd_kernel[(n_progs,)](
        g, x, weight, cos_, sin_, dx, dw,
        rows, seq, heads, seq * heads, dim, g.stride(0), g.stride(1), g.stride(2), x.stride(0), x.stride(1), x.stride(2),
        stride_cs, eps, n_progs, HAS_ROPE=cos is not None, NEED_DX=need_dx, NEED_DW=need_dw,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        **launch_options(warps),
    )
    return (dx if need_dx else None), (dw.sum(0).to(weight.dtype) if need_dw else None)


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))



def _forward(x, weight, cos, sin, eps):
    """The forward kernel on unit-last-stride operands (the Functions and the no-grad path share it)."""
    x, weight = unit_last_stride(x), weight.contiguous()
    if cos is not None:
        cos, sin = unit_last_stride(cos), unit_last_stride(sin)
    return backend.kernels_for(OP, x.device).forward(x, weight, cos, sin, eps)


class QKNormRopeFunction(torch.autograd.Function):
    """Saves x and weight (cos/sin are constants); backward recomputes rstd and the rotation."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        x, weight = unit_last_stride(x), weight.contiguous()
        if cos is not None:
            cos, sin = unit_last_stride(cos), unit_last_stride(sin)
        out = _forward(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, cos, sin = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = backend.kernels_for(OP, g.device).backward(
            unit_last_stride(g), x, weight, cos, sin, ctx.eps, need_dx, need_dw
        )
        return dx, dw, None, None, None


def _checked_tables(cos, sin, x: torch.Tensor, shape: tuple[int, int], what: str):
    """``cos``/``sin`` checked (both or neither; x's device; ``shape``) and detached."""
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be tensors or both be None")
    if cos is None:
        return None, None
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, like=x, like_name="x", ndim=2, same_dtype=False)
        check_shape(name, table, shape, what)
    return cos.detach(), sin.detach()


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm over the head dim with ``weight``, then interleaved RoPE; fp32 arithmetic.

    ``x``: ``[B, S, H, Dh]`` (Dh even); ``weight``: ``[Dh]`` (same dtype and device as x);
    ``cos``, ``sin``: ``[S, Dh]`` on x's device (any float dtype; fp32 in Flux) or both None.
    No gradient flows to ``cos``/``sin``.
    """
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, like=x, like_name="x", ndim=1)
    check_shape("weight", weight, (x.shape[-1],), "the head dim of x")
    if x.shape[-1] % 2:
        raise ValueError(f"x's head dim must be even for interleaved RoPE, got {x.shape[-1]}")
    cos, sin = _checked_tables(cos, sin, x, (x.shape[1], x.shape[3]), "(sequence, head dim) of x")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if compiling():
        return qk_norm_rope_reference(x, weight, cos, sin, eps)
    if not needs_autograd(x, weight):
        return _forward(x, weight, cos, sin, float(eps))
    return QKNormRopeFunction.apply(x, weight, cos, sin, float(eps))


# ----------------------------------------------------------------------------- with the projection
def linear_qk_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float = 1e-6, head_dim: int = 64,
) -> torch.Tensor:
    """diffusers' arithmetic: ``to_q(x).unflatten(-1, (-1, head_dim))`` -> RMSNorm -> RoPE."""
    q = F.linear(x, weight, bias).unflatten(-1, (-1, head_dim))
    return qk_norm_rope_reference(q, norm_weight, cos, sin, eps)


class LinearQKNormRopeFunction(torch.autograd.Function):
    """Saves the projection's input (which ``to_v`` saves anyway), never the projected q/k:
    backward recomputes ``q = x W^T + b`` (one matmul of forward size) before the norm/RoPE kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, cos, sin, eps, head_dim):
        q = F.linear(x, weight, bias).unflatten(-1, (-1, head_dim))
        norm_weight = norm_weight.contiguous()
        if cos is not None:
            cos, sin = unit_last_stride(cos), unit_last_stride(sin)
        out = _forward(q, norm_weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, bias, norm_weight, cos, sin)
        ctx.eps, ctx.head_dim = eps, head_dim
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, norm_weight, cos, sin = ctx.saved_tensors
        need_x, need_w, need_b, need_nw = ctx.needs_input_grad[:4]
        q = F.linear(x, weight, bias).unflatten(-1, (-1, ctx.head_dim))
        dq, dnw = backend.kernels_for(OP, g.device).backward(
            unit_last_stride(g), q, norm_weight, cos, sin, ctx.eps, need_x or need_w or need_b, need_nw
        )
        grad_x = grad_w = grad_b = None
        if dq is not None:
            dq2 = dq.reshape(-1, weight.shape[0])
            if need_x:
                grad_x = (dq2 @ weight).reshape(x.shape)
            if need_w:
                grad_w = dq2.t() @ x.reshape(-1, x.shape[-1])
            if need_b and bias is not None:
                grad_b = dq2.sum(0)
        return grad_x, grad_w, grad_b, dnw, None, None, None, None


def linear_qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    """`qk_norm_rope` of ``F.linear(x, weight, bias)`` split into heads of ``head_dim``, without
    saving the projection (for plain ``nn.Linear`` to_q / to_k; call the module for LoRA).

    ``x``: ``[B, S, K]``; ``weight``: ``[H * head_dim, K]``; returns ``[B, S, H, head_dim]``.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("weight", weight, like=x, like_name="x", ndim=2)
    if weight.shape[1] != x.shape[-1] or weight.shape[0] % head_dim:
        raise ValueError(
            f"weight must have shape (heads * {head_dim}, {x.shape[-1]}) for x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, like=x, like_name="x", ndim=1)
        check_shape("bias", bias, (weight.shape[0],), "the output features of weight")
    check_tensor("norm_weight", norm_weight, like=x, like_name="x", ndim=1)
    check_shape("norm_weight", norm_weight, (head_dim,), "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for interleaved RoPE, got {head_dim}")
    cos, sin = _checked_tables(cos, sin, x, (x.shape[1], head_dim), "(sequence of x, head_dim)")
    if compiling():
        return linear_qk_norm_rope_reference(x, weight, bias, norm_weight, cos, sin, eps, head_dim)
    if not needs_autograd(x, weight, bias, norm_weight):
        q = F.linear(x, weight, bias).unflatten(-1, (-1, head_dim))
        return _forward(q, norm_weight, cos, sin, float(eps))
    return LinearQKNormRopeFunction.apply(x, weight, bias, norm_weight, cos, sin, float(eps), int(head_dim))

"""Gated residual ``x + gate[b] * y`` in one pass (Flux: attention and MLP outputs, AdaLN-Zero gates).

    out = x + gate[:, None] * y          x, y: [B, S, D]; gate: [B, D]

Saved for backward: ``gate`` and ``y`` (``dx = g`` needs nothing; ``dy = gate g``;
``dgate = sum_s g y`` as per-program fp32 partials). Eager saves the same two tensors; the gain
is one kernel instead of a multiply and an add (two full-size intermediates and passes).
"""
from __future__ import annotations

import torch

from leapkernels import backend
from leapkernels.checks import check_shape, check_tensor, unit_last_stride
from leapkernels.ops._common import (
    acc_tl, compiling, launch_options, needs_autograd, register_op, row_launch, tl, triton,
)
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "gated_residual"


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """diffusers' arithmetic: ``x + gate.unsqueeze(1) * y``."""
    return x + gate.unsqueeze(1) * y


# ----------------------------------------------------------------------------- kernels (contract)
# forward(x[B,S,D], gate[B,D], y[B,S,D]) -> out[B,S,D] contiguous (all inputs unit last stride)
# backward(g[B,S,D], gate, y, need_dy, need_dgate) -> (dy | None, dgate[B,D] | None)


def _forward_reference(x, gate, y):
    acc = backend.accumulator_dtype(x.dtype)
    return (x.to(acc) + gate.to(acc)[:, None] * y.to(acc)).to(x.dtype)


def _backward_reference(g, gate, y, need_dy, need_dgate):
    acc = backend.accumulator_dtype(g.dtype)
    gf = g.to(acc)
    dy = (gf * gate.to(acc)[:, None]).to(y.dtype) if need_dy else None
    dgate = (gf * y.to(acc)).sum(1).to(gate.dtype) if need_dgate else None
    return dy, dgate


if triton is not None:

    @triton.jit
    def _gr_fwd_kernel(
        x_ptr, gate_ptr, y_ptr, out_ptr, S, D,
        stride_xb, stride_xs, stride_gb, stride_yb, stride_ys, n_progs,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # int64 offsets and row counters: no int32 overflow
        p = tl.program_id(1).to(tl.int64)
        for c0 in range(0, D, BLOCK_D):  # column chunks (one at FLUX.1 widths <= BLOCK_D)
            cols = tl.arange(0, BLOCK_D) + c0
            cmask = cols < D
            gate = tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(ACC)
            for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
                rows = tl.arange(0, BLOCK_R) + start
                mask = (rows < S)[:, None] & cmask[None, :]
                x = tl.load(x_ptr + (b * stride_xb + rows * stride_xs)[:, None] + cols[None, :], mask=mask, other=0.0)
                y = tl.load(y_ptr + (b * stride_yb + rows * stride_ys)[:, None] + cols[None, :], mask=mask, other=0.0)
                out = x.to(ACC) + gate[None, :] * y.to(ACC)
                out_offs = (b * S + rows)[:, None] * D + cols[None, :]
                tl.store(out_ptr + out_offs, rounded(out, out_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _gr_bwd_kernel(
        g_ptr, gate_ptr, y_ptr, dy_ptr, dgate_ptr, S, D,
        stride_g_b, stride_g_s, stride_gb, stride_yb, stride_ys, n_progs,
        NEED_DY: tl.constexpr, NEED_DGATE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """dy = gate g; this program's partial sum of g y over its rows, per column (fp32)."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        for c0 in range(0, D, BLOCK_D):
            cols = tl.arange(0, BLOCK_D) + c0
            cmask = cols < D
            gate = tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(ACC)
            dgate = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(p * BLOCK_R, S, n_progs * BLOCK_R):
                rows = tl.arange(0, BLOCK_R) + start
                mask = (rows < S)[:, None] & cmask[None, :]
                g = tl.load(g_ptr + (b * stride_g_b + rows * stride_g_s)[:, None] + cols[None, :], mask=mask, other=0.0)
                g = g.to(ACC)
                if NEED_DY:
                    dy_offs = (b * S + rows)[:, None] * D + cols[None, :]
                    tl.store(dy_ptr + dy_offs, rounded(g * gate[None, :], dy_ptr.dtype.element_ty, RTNE), mask=mask)
                if NEED_DGATE:
                    y = tl.load(y_ptr + (b * stride_yb + rows * stride_ys)[:, None] + cols[None, :], mask=mask, other=0.0)
                    dgate += tl.sum(g * y.to(ACC), 0)
            if NEED_DGATE:
                tl.store(dgate_ptr + (b * n_progs + p) * D + cols, dgate, mask=cmask)


def _forward_triton(x, gate, y):
    batch, seq, dim = x.shape
    block_r, block_d, n_progs, warps = row_launch(batch, seq, dim, x.device)
    out = backend.empty((batch, seq, dim), dtype=x.dtype, device=x.device)
    _gr_fwd_kernel[(batch, n_progs)](
        x, gate, y, out, seq, dim, x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), n_progs,
        BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(x.dtype), RTNE=emulate_bf16_rtne(x.dtype, x.device),
        **launch_options(warps),
    )
    return out


def _backward_triton(g, gate, y, need_dy, need_dgate):
    batch, seq, dim = g.shape
    block_r, block_d, n_progs, warps = row_launch(batch, seq, dim, g.device)
    acc = backend.accumulator_dtype(g.dtype)
    dy = backend.empty((batch, seq, dim), dtype=y.dtype, device=g.device) if need_dy else g
    dgate = backend.empty((batch, n_progs, dim) if need_dgate else (1,), dtype=acc, device=g.device)
    _gr_bwd_kernel[(batch, n_progs)](
        g, gate, y, dy, dgate, seq, dim, g.stride(0), g.stride(1), gate.stride(0), y.stride(0), y.stride(1), n_progs,
        NEED_DY=need_dy, NEED_DGATE=need_dgate, BLOCK_R=block_r, BLOCK_D=block_d,
        ACC=acc_tl(g.dtype), RTNE=emulate_bf16_rtne(g.dtype, g.device), **launch_options(warps),
    )
    return (dy if need_dy else None), (dgate.sum(1).to(gate.dtype) if need_dgate else None)


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


def _forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The forward kernel on unit-last-stride operands (the Function and the no-grad path share it)."""
    x, gate, y = unit_last_stride(x), unit_last_stride(gate), unit_last_stride(y)
    return backend.kernels_for(OP, x.device).forward(x, gate, y)


class GatedResidualFunction(torch.autograd.Function):
    """Saves gate and y; ``dx`` is the incoming gradient itself."""

    @staticmethod
    def forward(ctx, x, gate, y):
        gate, y = unit_last_stride(gate), unit_last_stride(y)  # saved as the backward kernel reads them
        out = _forward(x, gate, y)
        ctx.save_for_backward(gate if ctx.needs_input_grad[2] else None, y if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    def backward(ctx, g):
        gate, y = ctx.saved_tensors
        need_dy, need_dgate = ctx.needs_input_grad[2], ctx.needs_input_grad[1]
        dy = dgate = None
        if need_dy or need_dgate:
            g = unit_last_stride(g)  # also the placeholder for an unneeded operand: every backend checks strides
            dy, dgate = backend.kernels_for(OP, g.device).backward(
                g, gate if gate is not None else g[:, 0], y if y is not None else g, need_dy, need_dgate,
            )
        return (g if ctx.needs_input_grad[0] else None), dgate, dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` fused. ``x``, ``y``: ``[B, S, D]``; ``gate``: ``[B, D]``; one dtype/device."""
    check_tensor("x", x, ndim=3)
    check_tensor("gate", gate, like=x, like_name="x", ndim=2)
    check_tensor("y", y, like=x, like_name="x", ndim=3)
    check_shape("y", y, x.shape, "the shape of x")
    check_shape("gate", gate, (x.shape[0], x.shape[2]), "(batch, features) of x")
    if compiling():
        return gated_residual_reference(x, gate, y)
    if not needs_autograd(x, gate, y):
        return _forward(x, gate, y)
    return GatedResidualFunction.apply(x, gate, y)

"""Leap update + straight-through connector + per-sample distance, in one pass (DESIGN §2 steps 3–5).

    leap      = x_from + c * v                    (c: one coefficient per sample, or a scalar)
    connected = x_true   in value, gradient to the leap (straight-through: d/dx_from = I, d/dv = c)
    distance  = mean |x_true - leap| per sample   (fp32; fp64 for fp64 inputs; no gradient)

The paper writes the connector as ``leap + sg(x_true - leap)``; here its value is ``x_true``
exactly (no low-precision round trip), and the distance is accumulated in fp32 (fp64 for fp64
inputs) from the un-rounded leap. Nothing is saved for backward except ``v`` (and only when ``c`` needs a
gradient): ``d/dx_from = g`` and ``d/dv = c g`` need no activations.
"""
from __future__ import annotations

import torch

from leapkernels import backend
from leapkernels.checks import as_rows, check_shape, check_tensor, per_sample
from leapkernels.ops._common import (
    acc_tl, compiling, device_fn, launch_options, needs_autograd, register_op, stream_launch, tl, triton,
)
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "leap_connector"


# ----------------------------------------------------------------------------- reference (autograd)
def leap_connector_reference(
    x_from: torch.Tensor, v: torch.Tensor, c: float | torch.Tensor, x_true: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch, autograd-composed: the truth the kernels are tested against (run it in fp64),
    and the op LeapAlign's objectives run when told not to use the kernels.

    ``connected = x_true + (leap - sg(leap))``: its value is ``x_true`` bit for bit (``+ 0``), its
    gradient the leap's. (The paper's ``leap + sg(x_true - leap)`` rounds twice in low precision
    and would perturb the rollout the reward sees.) Arithmetic in the inputs' dtype (the
    low-precision baseline); the distance ``mean |x_true - leap|`` per sample, without gradient,
    in the wider of float32 and the inputs' dtype.
    """
    coef = c.reshape(-1, *([1] * (x_from.dim() - 1))).to(x_from.dtype) if isinstance(c, torch.Tensor) else c
    leap = x_from + coef * v
    if x_true is None:
        return leap, None
    connected = x_true.detach() + (leap - leap.detach())
    return connected, mean_abs_distance(x_true, leap)


def mean_abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean |a - b|`` over all non-batch dims, no gradient: ``[B]`` in the wider of
    float32 and the inputs' dtype (float32 for bf16/fp16, float64 for float64)."""
    acc = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.no_grad():
        return (a.detach().to(acc) - b.detach().to(acc)).abs().flatten(1).mean(1)


# ----------------------------------------------------------------------------- kernels (contract)
# forward(x[B,N], v[B,N], c[B] acc, x_true[B,N] | None) -> (out[B,N] (connected or leap), distance[B] acc | None)
# backward(g[B,N], v[B,N] | None, c[B] acc, need_dc) -> (grad_v[B,N], dc[B] acc | None)


def _forward_reference(x, v, c, x_true):
    acc = backend.accumulator_dtype(x.dtype)
    leap = x.to(acc) + c[:, None] * v.to(acc)
    if x_true is None:
        return leap.to(x.dtype), None
    distance = (x_true.to(acc) - leap).abs().mean(1)
    return x_true.clone(memory_format=torch.contiguous_format), distance


def _backward_reference(g, v, c, need_dc):
    acc = backend.accumulator_dtype(g.dtype)
    grad_v = (c[:, None] * g.to(acc)).to(g.dtype)
    dc = (g.to(acc) * v.to(acc)).sum(1) if need_dc else None
    return grad_v, dc


if triton is not None:

    @device_fn
    def _row_slice(ptr, row_off, start, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
        """Elements ``[start, start + BLOCK)`` of a row: (values in ACC, offsets, mask)."""
        offs = tl.arange(0, BLOCK) + start
        mask = offs < N
        return tl.load(ptr + row_off + offs, mask=mask, other=0.0).to(ACC), offs, mask

    @triton.jit
    def _leap_fwd_kernel(
        x_ptr, v_ptr, t_ptr, c_ptr, out_ptr, part_ptr,
        N, stride_x, stride_v, stride_t, n_progs,
        HAS_TRUE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """out = x_true (connector) or the leap; this program's partial sum of |x_true - leap|."""
        b = tl.program_id(0).to(tl.int64)  # a 64-bit loop counter: offsets past 2**31 must not wrap
        p = tl.program_id(1).to(tl.int64)
        c = tl.load(c_ptr + b).to(ACC)
        dist = tl.zeros([BLOCK], dtype=ACC)
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            x, offs, mask = _row_slice(x_ptr, b * stride_x, start, N, BLOCK, ACC)
            v, _, _ = _row_slice(v_ptr, b * stride_v, start, N, BLOCK, ACC)
            leap = x + c * v
            if HAS_TRUE:
                t = tl.load(t_ptr + b * stride_t + offs, mask=mask, other=0.0)
                tl.store(out_ptr + b * N + offs, t, mask=mask)  # the true value, bit for bit
                dist += tl.where(mask, tl.abs(t.to(ACC) - leap), 0.0)
            else:
                tl.store(out_ptr + b * N + offs, rounded(leap, out_ptr.dtype.element_ty, RTNE), mask=mask)
        if HAS_TRUE:
            tl.store(part_ptr + b * n_progs + p, tl.sum(dist, 0))

    @triton.jit
    def _leap_bwd_kernel(
        g_ptr, v_ptr, c_ptr, gv_ptr, part_ptr,
        N, stride_g, stride_v, n_progs,
        NEED_DC: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr,
    ):
        """grad_v = c g; this program's partial sum of g v (d/dc)."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        c = tl.load(c_ptr + b).to(ACC)
        dc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            g, offs, mask = _row_slice(g_ptr, b * stride_g, start, N, BLOCK, ACC)
            tl.store(gv_ptr + b * N + offs, rounded(c * g, gv_ptr.dtype.element_ty, RTNE), mask=mask)
            if NEED_DC:
                v, _, _ = _row_slice(v_ptr, b * stride_v, start, N, BLOCK, ACC)
                dc += g * v
        if NEED_DC:
            tl.store(part_ptr + b * n_progs + p, tl.sum(dc, 0))


def _launch(kernel, like: torch.Tensor, pointers: tuple, strides: tuple, **constexprs) -> torch.Tensor:
    """Run a stream ``kernel(*pointers, part, N, *strides, n_progs)`` over ``like``'s ``[B, N]``;
    returns its per-program partial sums ``part``."""
    (batch, n), device = like.shape, like.device
    block, n_progs, warps = stream_launch(batch, n, device)
    part = backend.empty((batch, n_progs), dtype=backend.accumulator_dtype(like.dtype), device=device)
    kernel[(batch, n_progs)](
        *pointers, part, n, *strides, n_progs, BLOCK=block, ACC=acc_tl(like.dtype),
        RTNE=emulate_bf16_rtne(like.dtype, device), **constexprs, **launch_options(warps),
    )
    return part


def _forward_triton(x, v, c, x_true):
    batch, n = x.shape
    out = backend.empty((batch, n), dtype=x.dtype, device=x.device)
    t = x_true if x_true is not None else x
    part = _launch(_leap_fwd_kernel, x, (x, v, t, c, out), (x.stride(0), v.stride(0), t.stride(0)),
                   HAS_TRUE=x_true is not None)
    return out, (part.sum(1) / n if x_true is not None else None)


def _backward_triton(g, v, c, need_dc):
    batch, n = g.shape
    grad_v = backend.empty((batch, n), dtype=g.dtype, device=g.device)
    vv = v if v is not None else g
    part = _launch(_leap_bwd_kernel, g, (g, vv, c, grad_v), (g.stride(0), vv.stride(0)), NEED_DC=need_dc)
    return grad_v, (part.sum(1) if need_dc else None)


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


# ----------------------------------------------------------------------------- autograd
def _forward(x_from, v, c, x_true):
    """``(out [B, ...], distance [B] | None, coef [B])``: the forward kernel on row views."""
    kernels = backend.kernels_for(OP, x_from.device)
    coef = per_sample("c", c, x_from.shape[0], x_from.device, backend.accumulator_dtype(x_from.dtype))
    rows_t = as_rows(x_true) if x_true is not None else None
    out, distance = kernels.forward(as_rows(x_from), as_rows(v), coef, rows_t)
    return out.view(x_from.shape), distance, coef


def _apply(x_from, v, c, x_true):
    """The Function when autograd must record the call; the bare kernel otherwise (nothing saved);
    the plain-PyTorch reference under ``torch.compile``."""
    if compiling():
        return leap_connector_reference(x_from, v, c, x_true)
    if not needs_autograd(x_from, v, c if isinstance(c, torch.Tensor) else None):
        out, distance, _ = _forward(x_from, v, c, x_true)
        return out, distance
    c_shape = tuple(c.shape) if isinstance(c, torch.Tensor) else ()
    return LeapConnectorFunction.apply(x_from, v, c, c_shape, x_true)


class LeapConnectorFunction(torch.autograd.Function):
    """Saves ``v`` only if ``c`` needs a gradient, else nothing; ``x_true`` gets no gradient."""

    @staticmethod
    def forward(ctx, x_from, v, c_tensor, c_arg_shape, x_true):
        out, distance, coef = _forward(x_from, v, c_tensor, x_true)
        need_dc = isinstance(c_tensor, torch.Tensor) and ctx.needs_input_grad[2]
        ctx.save_for_backward(v if need_dc else None)
        ctx.coef, ctx.need_dc, ctx.c_arg_shape, ctx.shape = coef, need_dc, c_arg_shape, x_from.shape
        ctx.c_dtype = c_tensor.dtype if isinstance(c_tensor, torch.Tensor) else None
        if distance is not None:
            ctx.mark_non_differentiable(distance)
        return out, distance

    @staticmethod
    def backward(ctx, grad_out, grad_distance):
        (v,) = ctx.saved_tensors
        kernels = backend.kernels_for(OP, grad_out.device)
        g = as_rows(grad_out)
        grad_v, dc = kernels.backward(g, as_rows(v) if v is not None else None, ctx.coef, ctx.need_dc)
        grad_c = None
        if ctx.need_dc:
            per_sample_c = len(ctx.c_arg_shape) == 1 and ctx.c_arg_shape[0] == dc.shape[0]
            grad_c = (dc if per_sample_c else dc.sum()).reshape(ctx.c_arg_shape).to(ctx.c_dtype)
        return grad_out, grad_v.view(ctx.shape), grad_c, None, None


def _validate(x_from, v, c, x_true) -> None:
    check_tensor("x_from", x_from)
    if x_from.dim() < 1:
        raise ValueError(f"x_from must have a batch dimension, got shape {tuple(x_from.shape)}")
    check_tensor("v", v, like=x_from, like_name="x_from")
    check_shape("v", v, x_from.shape, "the shape of x_from")
    if x_true is not None:
        check_tensor("x_true", x_true, like=x_from, like_name="x_from")
        check_shape("x_true", x_true, x_from.shape, "the shape of x_from")
    if isinstance(c, torch.Tensor):
        if c.dim() > 1 or (c.dim() == 1 and c.shape[0] not in (1, x_from.shape[0])):
            raise ValueError(f"c must be a scalar or have shape ({x_from.shape[0]},), got {tuple(c.shape)}")
        if c.device != x_from.device and c.numel() != 1:
            raise ValueError(f"c is on {c.device} but x_from is on {x_from.device}; expected the same device")


def leap_connector(
    x_from: torch.Tensor, v: torch.Tensor, c: float | torch.Tensor, x_true: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leap ``x_from + c v`` connected to ``x_true``: returns ``(connected, distance)``.

    ``connected`` has the value of ``x_true`` and the gradient of the leap (``d/dx_from = I``,
    ``d/dv = c``, ``d/dc = <g, v>`` per sample if ``c`` is a tensor needing grad); ``distance`` is
    the per-sample ``mean |x_true - leap|`` (fp32; fp64 for fp64 inputs), without gradient. ``c``: a float, a 0-d tensor
    or one value per sample ``[B]``. ``x_from``, ``v``, ``x_true``: same shape ``[B, ...]``,
    dtype and device.
    """
    _validate(x_from, v, c, x_true)
    if x_true is None:
        raise ValueError("x_true must be a tensor; use leap() for the leap without a connector")
    return _apply(x_from, v, c, x_true.detach())


def leap(x_from: torch.Tensor, v: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """The leap ``x_from + c v`` alone (fp32 arithmetic, stored in ``x_from``'s dtype), nothing saved."""
    _validate(x_from, v, c, None)
    out, _ = _apply(x_from, v, c, None)
    return out

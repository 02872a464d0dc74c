"""SwiGLU recomputed in backward, alone, fused with the down projection, and closing a gated residual.

    swiglu(h) = silu(g) * u,   [g, u] = h split in halves along the last dim     h: [..., 2K] -> [..., K]

FLUX.2's feed-forward (``Flux2FeedForward``: ``linear_out(swiglu(linear_in(x)))``) and its
parallel single blocks (``to_out(cat([attention, swiglu(mlp)]))``) use it, as diffusers'
``Flux2SwiGLU`` writes it (gate first, then the linear half).

`swiglu(h)`: saves ``h`` only (eager saves ``h`` — both halves are views of it — and ``silu(g)``).
`swiglu_linear(h, weight, bias, prefix)`: ``linear(cat([prefix, swiglu(h)], -1))`` without saving
the activation (backward recomputes it for the weight gradient), as `gelu_linear` does for FLUX.1.
`gated_swiglu_linear(residual, gate, h, weight, bias, prefix)`: ``residual + gate[b] * linear(...)``
saving neither the activation nor the projection (as `gated_linear`): backward recomputes both.

``h`` may be a strided view (the single blocks' MLP half of ``to_qkv_mlp_proj``'s output): the
kernels read rows with any row stride and unit column stride, so nothing is copied or saved twice.
The matmuls are PyTorch's (the calls eager makes), so forward results match eager's bitwise
wherever eager computes in the same precision. When no input needs a gradient (the no-grad
rollout) the forward kernels run directly, without the Function; under ``torch.compile`` the ops
lower to their references (as every leapkernels op).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leapkernels import backend
from leapkernels.checks import check_shape, check_tensor, unit_last_stride
from leapkernels.ops._common import (
    acc_tl, compiling, device_fn, launch_options, needs_autograd, register_op, row_launch, tl, triton,
)
from leapkernels.ops.gated_residual import OP as GATED_RESIDUAL
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "swiglu"


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """diffusers' ``Flux2SwiGLU``: ``silu(h[..., :K]) * h[..., K:]``."""
    half = h.shape[-1] // 2
    return F.silu(h[..., :half]) * h[..., half:]


def swiglu_linear_reference(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' arithmetic: ``linear(cat([prefix, swiglu(h)], -1))``."""
    a = swiglu_reference(h)
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return F.linear(a, weight, bias)


def gated_swiglu_linear_reference(
    residual: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """diffusers' arithmetic: ``residual + gate.unsqueeze(1) * linear(cat([prefix, swiglu(h)]))``."""
    return residual + gate.unsqueeze(1) * swiglu_linear_reference(h, weight, bias, prefix)


# ----------------------------------------------------------------------------- kernels (contract)
# forward(h[R, 2K] (unit column stride, any row stride)) -> a[R, K] contiguous
# backward(da[R, K] contiguous, h[R, 2K] as above) -> dh[R, 2K] contiguous


def _forward_reference(h):
    acc = backend.accumulator_dtype(h.dtype)
    g, u = h.to(acc).chunk(2, dim=-1)
    return (F.silu(g) * u).to(h.dtype)


def _backward_reference(da, h):
    acc = backend.accumulator_dtype(h.dtype)
    g, u = h.to(acc).chunk(2, dim=-1)
    sig, daf = torch.sigmoid(g), da.to(acc)
    dg = daf * u * sig * (1 + g * (1 - sig))
    return torch.cat([dg, daf * g * sig], dim=-1).to(h.dtype)


if triton is not None:

    @device_fn
    def _sigmoid_pair(g):
        """sigmoid(g) and 1 - sigmoid(g), both accurate, from e = exp(-|g|) <= 1 (no overflow)."""
        e = tl.exp(-tl.abs(g))
        inv = 1.0 / (1.0 + e)
        return tl.where(g >= 0, inv, e * inv), tl.where(g >= 0, e * inv, inv)

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, out_ptr, R, K, stride_h, n_progs,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)  # int64 row counters and offsets: no int32 overflow
        for start in range(p * BLOCK_R, R, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R) + start
            rmask = rows < R
            for c0 in range(0, K, BLOCK_D):
                cols = tl.arange(0, BLOCK_D) + c0
                mask = rmask[:, None] & (cols < K)[None, :]
                offs = (rows * stride_h)[:, None] + cols[None, :]
                g = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
                u = tl.load(h_ptr + offs + K, mask=mask, other=0.0).to(ACC)
                sig, _ = _sigmoid_pair(g)
                out_offs = (rows * K)[:, None] + cols[None, :]
                tl.store(out_ptr + out_offs, rounded(g * sig * u, out_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(da_ptr, h_ptr, dh_ptr, R, K, stride_h, n_progs,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr):
        """dg = da u sig (1 + g (1 - sig)), du = da g sig; written into the halves of dh's rows."""
        p = tl.program_id(0).to(tl.int64)
        for start in range(p * BLOCK_R, R, n_progs * BLOCK_R):
            rows = tl.arange(0, BLOCK_R) + start
            rmask = rows < R
            for c0 in range(0, K, BLOCK_D):
                cols = tl.arange(0, BLOCK_D) + c0
                mask = rmask[:, None] & (cols < K)[None, :]
                offs = (rows * stride_h)[:, None] + cols[None, :]
                g = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
                u = tl.load(h_ptr + offs + K, mask=mask, other=0.0).to(ACC)
                da = tl.load(da_ptr + (rows * K)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
                sig, sig_c = _sigmoid_pair(g)
                dg = da * u * sig * (1.0 + g * sig_c)
                du = da * g * sig
                dh_offs = (rows * (2 * K))[:, None] + cols[None, :]
                tl.store(dh_ptr + dh_offs, rounded(dg, dh_ptr.dtype.element_ty, RTNE), mask=mask)
                tl.store(dh_ptr + dh_offs + K, rounded(du, dh_ptr.dtype.element_ty, RTNE), mask=mask)


def _launch(kernel, tensors: tuple, rows: int, k: int, stride_h: int, like: torch.Tensor, tile_fraction: int) -> None:
    block_r, block_d, n_progs, warps = row_launch(1, rows, k, like.device, tile_fraction=tile_fraction)
    kernel[(n_progs,)](
        *tensors, rows, k, stride_h, n_progs, BLOCK_R=block_r, BLOCK_D=block_d, ACC=acc_tl(like.dtype),
        RTNE=emulate_bf16_rtne(like.dtype, like.device), **launch_options(warps),
    )


def _forward_triton(h):
    rows, k = h.shape[0], h.shape[1] // 2
    out = backend.empty((rows, k), dtype=h.dtype, device=h.device)
    _launch(_swiglu_fwd_kernel, (h, out), rows, k, h.stride(0), h, 1)
    return out


def _backward_triton(da, h):
    rows, k = h.shape[0], h.shape[1] // 2
    dh = backend.empty((rows, 2 * k), dtype=h.dtype, device=h.device)
    # half tiles: backward holds g, u, da and both results at once
    _launch(_swiglu_bwd_kernel, (da, h, dh), rows, k, h.stride(0), h, 2)
    return dh


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


# ----------------------------------------------------------------------------- autograd
def _rows(h: torch.Tensor) -> torch.Tensor:
    """``h`` as ``[R, 2K]`` rows with unit column stride: a view where one exists (no copy)."""
    return unit_last_stride(h).reshape(-1, h.shape[-1])


def act_forward(h: torch.Tensor) -> torch.Tensor:
    """swiglu(h) by the selected backend's kernel (no autograd), shaped ``[..., K]``."""
    a = backend.kernels_for(OP, h.device).forward(_rows(h))
    return a.view(*h.shape[:-1], h.shape[-1] // 2)


def act_backward(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient of ``h`` given swiglu(h)'s, by the selected backend's kernel."""
    dh = backend.kernels_for(OP, h.device).backward(da.contiguous().view(-1, h.shape[-1] // 2), _rows(h))
    return dh.view(h.shape)


def _with_prefix(a: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    return a if prefix is None else torch.cat([prefix, a], dim=-1)


def _linear_forward(h, weight, bias, prefix):
    return F.linear(_with_prefix(act_forward(h), prefix), weight, bias)


def _gated_forward(residual, gate, h, weight, bias, prefix):
    y = _linear_forward(h, weight, bias, prefix)
    return backend.kernels_for(GATED_RESIDUAL, h.device).forward(unit_last_stride(residual), unit_last_stride(gate), y)


class SwiGLUFunction(torch.autograd.Function):
    """Saves h; backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return act_forward(h)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return act_backward(da, h)


def _linear_input_grads(dy2, weight, prefix, h, need_h, need_p, shape):
    """Gradients of ``h`` and ``prefix`` through ``linear(cat([prefix, swiglu(h)]))``."""
    da = (dy2 @ weight.to(dy2.dtype)).reshape(*shape[:-1], weight.shape[1])
    grad_p = None
    if prefix is not None:
        grad_p = da[..., : prefix.shape[-1]] if need_p else None
        da = da[..., prefix.shape[-1]:]
    return (act_backward(da, h) if need_h else None), grad_p


class SwiGLULinearFunction(torch.autograd.Function):
    """Saves h, weight and prefix (never swiglu(h) nor the concatenation)."""

    @staticmethod
    def forward(ctx, h, weight, bias, prefix):
        out = _linear_forward(h, weight, bias, prefix)
        ctx.save_for_backward(h, weight, prefix)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, prefix = ctx.saved_tensors
        need_h, need_w, need_b, need_p = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        grad_h = grad_w = grad_b = grad_p = None
        if need_h or need_p:
            grad_h, grad_p = _linear_input_grads(g2, weight, prefix, h, need_h, need_p, g.shape)
        if need_w:
            a = _with_prefix(act_forward(h), prefix)
            grad_w = (g2.t() @ a.reshape(-1, a.shape[-1])).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_h, grad_w, grad_b, grad_p


class GatedSwiGLULinearFunction(torch.autograd.Function):
    """Saves h, prefix, gate, weight, bias; never swiglu(h), the concatenation, nor the projection."""

    @staticmethod
    def forward(ctx, residual, gate, h, weight, bias, prefix):
        out = _gated_forward(residual, gate, h, weight, bias, prefix)
        ctx.save_for_backward(h, prefix, gate, weight, bias)
        return out

    @staticmethod
    def backward(ctx, g):
        h, prefix, gate, weight, bias = ctx.saved_tensors
        need_res, need_gate, need_h, need_w, need_b, need_p = ctx.needs_input_grad
        a = _with_prefix(act_forward(h), prefix) if (need_gate or need_w) else None
        y = F.linear(a, weight, bias) if need_gate else None
        g = g.contiguous()
        dy, dgate = backend.kernels_for(GATED_RESIDUAL, g.device).backward(
            g, unit_last_stride(gate), y if y is not None else g, True, need_gate)
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_h = grad_w = grad_b = grad_p = None
        if need_h or need_p:
            grad_h, grad_p = _linear_input_grads(dy2, weight, prefix, h, need_h, need_p, dy.shape)
        if need_w:
            grad_w = dy2.t() @ a.reshape(-1, a.shape[-1])
        if need_b and bias is not None:
            grad_b = dy2.sum(0)
        return (g if need_res else None), dgate, grad_h, grad_w, grad_b, grad_p


# ----------------------------------------------------------------------------- public ops
def _check_h(h: object) -> torch.Tensor:
    check_tensor("h", h)
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h's last dim must be even (gate and linear halves), got shape {tuple(h.shape)}")
    return h


def _check_projection(h, weight, bias, prefix, like, like_name) -> None:
    """weight ``[N, P + K]``, bias ``[N]``, prefix ``[..., P]`` with h's leading dims."""
    check_tensor("weight", weight, like=like, like_name=like_name, ndim=2)
    k = h.shape[-1] // 2
    if prefix is not None:
        check_tensor("prefix", prefix, like=like, like_name=like_name)
        if prefix.shape[:-1] != h.shape[:-1]:
            raise ValueError(f"prefix must have leading dims {tuple(h.shape[:-1])} (those of h), got {tuple(prefix.shape)}")
        k += prefix.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(f"weight must have {k} input features (prefix + half of h), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, like=like, like_name=like_name, ndim=1)
        check_shape("bias", bias, (weight.shape[0],), "the output features of weight")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :K]) * h[..., K:]`` computed in fp32, saving only ``h`` (``[..., 2K]`` -> ``[..., K]``)."""
    _check_h(h)
    if compiling():
        return swiglu_reference(h)
    if not needs_autograd(h):
        return act_forward(h)
    return SwiGLUFunction.apply(h)


def swiglu_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(cat([prefix, swiglu(h)], -1), weight, bias)`` without saving the activation.

    ``h``: ``[..., 2K]``; ``prefix``: ``[..., P]`` (same leading dims) or None; ``weight``:
    ``[N, P + K]`` (a plain tensor: call the module itself for LoRA-wrapped layers); ``bias``:
    ``[N]`` or None. All one dtype and device.
    """
    _check_h(h)
    _check_projection(h, weight, bias, prefix, h, "h")
    if compiling():
        return swiglu_linear_reference(h, weight, bias, prefix)
    if not needs_autograd(h, weight, bias, prefix):
        return _linear_forward(h, weight, bias, prefix)
    return SwiGLULinearFunction.apply(h, weight, bias, prefix)


def gated_swiglu_linear(
    residual: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + gate[:, None] * F.linear(cat([prefix, swiglu(h)], -1), weight, bias)``.

    ``residual``: ``[B, S, N]``; ``gate``: ``[B, N]``; ``h``: ``[B, S, 2K]``; ``prefix``:
    ``[B, S, P]`` or None; ``weight``: ``[N, P + K]``; ``bias``: ``[N]`` or None. One dtype and device.
    """
    check_tensor("residual", residual, ndim=3)
    check_tensor("gate", gate, like=residual, like_name="residual", ndim=2)
    _check_h(h)
    check_tensor("h", h, like=residual, like_name="residual", ndim=3)
    b, s, n = residual.shape
    check_shape("gate", gate, (b, n), "(batch, features) of residual")
    if h.shape[:2] != (b, s):
        raise ValueError(f"h must have leading dims {(b, s)} (those of residual), got {tuple(h.shape)}")
    _check_projection(h, weight, bias, prefix, residual, "residual")
    if weight.shape[0] != n:
        raise ValueError(f"weight must have {n} output features (those of residual), got shape {tuple(weight.shape)}")
    if compiling():
        return gated_swiglu_linear_reference(residual, gate, h, weight, bias, prefix)
    if not needs_autograd(residual, gate, h, weight, bias, prefix):
        return _gated_forward(residual, gate, h, weight, bias, prefix)
    return GatedSwiGLULinearFunction.apply(residual, gate, h, weight, bias, prefix)

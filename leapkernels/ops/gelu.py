"""tanh-GELU recomputed in backward, alone and fused with the down projection that follows it.

    gelu(h) = 0.5 h (1 + tanh(u)) = h sigmoid(2u),   u = sqrt(2/pi) (h + 0.044715 h^3)

(tanh through sigmoid: no ``libdevice`` in the interpreter; written so neither cancels nor overflows.)

`gelu_tanh(h)`: saves ``h`` only (eager saves the same; the point is the kernel).
`gelu_linear(h, weight, bias, prefix)`: ``linear(cat([prefix, gelu(h)], -1), weight, bias)`` —
the activation ``gelu(h)`` (4x the model width in Flux's MLPs) is *not* saved: backward recomputes
it for the weight gradient and the input gradient (DESIGN §3, what brings a Flux forward to
<= 0.5x the eager saved bytes). ``prefix`` covers Flux's single blocks, whose ``proj_out`` reads
``cat([attention_out, gelu(mlp)])``; the concatenation is rebuilt in backward, never saved.
The matmuls are PyTorch's (cuBLAS / MKL), the same calls eager makes, so results match bitwise
in forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leapkernels import backend
from leapkernels.checks import check_tensor
from leapkernels.ops._common import (
    acc_tl, compiling, device_fn, launch_options, needs_autograd, register_op, stream_launch, tl, triton,
)
from leapkernels.ops.rounding import emulate_bf16_rtne, rounded

OP = "gelu_tanh"
_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715


def gelu_tanh_reference(h: torch.Tensor) -> torch.Tensor:
    """PyTorch's ``F.gelu(h, approximate="tanh")`` (what diffusers' FeedForward and Flux call)."""
    return F.gelu(h, approximate="tanh")


def gelu_linear_reference(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' arithmetic: ``linear(cat([prefix, gelu(h)], -1))``."""
    a = F.gelu(h, approximate="tanh")
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return F.linear(a, weight, bias)


# ----------------------------------------------------------------------------- kernels (contract)
# forward(h contiguous) -> gelu(h) (h's dtype);  backward(da contiguous, h contiguous) -> dh


def _forward_reference(h):
    acc = backend.accumulator_dtype(h.dtype)
    return F.gelu(h.to(acc), approximate="tanh").to(h.dtype)


def _backward_reference(da, h):
    acc = backend.accumulator_dtype(h.dtype)
    hf = h.to(acc)
    t = torch.tanh(_K0 * (hf + _K1 * hf * hf * hf))
    d = 0.5 * (1.0 + t) + 0.5 * hf * (1.0 - t * t) * _K0 * (1.0 + 3.0 * _K1 * hf * hf)
    return (da.to(acc) * d).to(h.dtype)


if triton is not None:

    @device_fn
    def _gelu_gates(h):
        """sigmoid(2u) and 1 - sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3), both accurate, from
        e = exp(-2|u|) <= 1 (0.5 (1 + tanh(u)) = sigmoid(2u): no libdevice, no overflow)."""
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        e = tl.exp(-2.0 * tl.abs(u))
        inv = 1.0 / (1.0 + e)
        return tl.where(u >= 0, inv, e * inv), tl.where(u >= 0, e * inv, inv)

    @triton.jit
    def _gelu_fwd_kernel(h_ptr, out_ptr, N, n_progs, BLOCK: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)  # a 64-bit loop counter: offsets past 2**31 must not wrap
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            offs = tl.arange(0, BLOCK) + start
            mask = offs < N
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
            sig, _ = _gelu_gates(h)
            tl.store(out_ptr + offs, rounded(h * sig, out_ptr.dtype.element_ty, RTNE), mask=mask)

    @triton.jit
    def _gelu_bwd_kernel(da_ptr, h_ptr, dh_ptr, N, n_progs, BLOCK: tl.constexpr, ACC: tl.constexpr, RTNE: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)  # a 64-bit loop counter: offsets past 2**31 must not wrap
        for start in range(p * BLOCK, N, n_progs * BLOCK):
            offs = tl.arange(0, BLOCK) + start
            mask = offs < N
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
            da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(ACC)
            # d/dh [h sig] = sig + h * 2 sig (1 - sig) du/dh,  1 - tanh(u)^2 = 4 sig (1 - sig)
            sig, sig_c = _gelu_gates(h)
            d = sig + 2.0 * h * sig * sig_c * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
            tl.store(dh_ptr + offs, rounded(da * d, dh_ptr.dtype.element_ty, RTNE), mask=mask)


def _launch(kernel, tensors: tuple, n: int, like: torch.Tensor) -> None:
    block, n_progs, warps = stream_launch(1, n, like.device)
    kernel[(n_progs,)](
        *tensors, n, n_progs, BLOCK=block, ACC=acc_tl(like.dtype), RTNE=emulate_bf16_rtne(like.dtype, like.device),
        **launch_options(warps),
    )


def _forward_triton(h):
    out = backend.empty(h.shape, dtype=h.dtype, device=h.device)
    _launch(_gelu_fwd_kernel, (h, out), h.numel(), h)
    return out


def _backward_triton(da, h):
    dh = backend.empty(h.shape, dtype=h.dtype, device=h.device)
    _launch(_gelu_bwd_kernel, (da, h, dh), h.numel(), h)
    return dh


register_op(OP, (_forward_reference, _backward_reference), (_forward_triton, _backward_triton))


# ----------------------------------------------------------------------------- autograd
class GeluTanhFunction(torch.autograd.Function):
    """Saves h; backward recomputes tanh."""

    @staticmethod
    def forward(ctx, h):
        h = h.contiguous()
        ctx.save_for_backward(h)
        return backend.kernels_for(OP, h.device).forward(h)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return backend.kernels_for(OP, h.device).backward(da.contiguous(), h)


def _gelu_linear_forward(h, weight, bias, prefix):
    """The GELU kernel, then PyTorch's matmul over ``cat([prefix, gelu(h)])``; ``h`` contiguous."""
    a = backend.kernels_for(OP, h.device).forward(h)
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return F.linear(a, weight, bias)


class GeluLinearFunction(torch.autograd.Function):
    """Saves h, weight and prefix (never gelu(h) nor the concatenation); backward recomputes gelu(h)."""

    @staticmethod
    def forward(ctx, h, weight, bias, prefix):
        h = h.contiguous()
        out = _gelu_linear_forward(h, weight, bias, prefix)
        ctx.save_for_backward(h, weight, prefix)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, prefix = ctx.saved_tensors
        need_h, need_w, need_b, need_p = ctx.needs_input_grad
        kernels = backend.kernels_for(OP, h.device)
        grad_h = grad_w = grad_b = grad_p = None
        g2 = g.reshape(-1, g.shape[-1])
        if need_h or need_p:
            da = g2 @ weight.to(g.dtype)
            da = da.reshape(*g.shape[:-1], weight.shape[1])
            if prefix is not None:
                grad_p = da[..., : prefix.shape[-1]] if need_p else None
                da = da[..., prefix.shape[-1]:]
            if need_h:
                grad_h = kernels.backward(da.contiguous(), h)
        if need_w:
            a = kernels.forward(h)
            if prefix is not None:
                a = torch.cat([prefix, a], dim=-1)
            grad_w = (g2.t() @ a.reshape(-1, a.shape[-1])).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_h, grad_w, grad_b, grad_p


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """``F.gelu(h, approximate="tanh")`` computed in fp32, saving only ``h``."""
    check_tensor("h", h)
    if compiling():
        return gelu_tanh_reference(h)
    if not needs_autograd(h):
        return backend.kernels_for(OP, h.device).forward(h.contiguous())
    return GeluTanhFunction.apply(h)


def gelu_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(cat([prefix, gelu_tanh(h)], -1), weight, bias)`` without saving the activation.

    ``h``: ``[..., K]``; ``prefix``: ``[..., P]`` (same leading dims) or None; ``weight``:
    ``[N, P + K]`` (a plain tensor: call the module itself for LoRA-wrapped layers); ``bias``:
    ``[N]`` or None. All one dtype and device.
    """
    check_tensor("h", h)
    check_tensor("weight", weight, like=h, like_name="h", ndim=2)
    k = h.shape[-1] + (0 if prefix is None else prefix.shape[-1])
    if prefix is not None:
        check_tensor("prefix", prefix, like=h, like_name="h")
        if prefix.shape[:-1] != h.shape[:-1]:
            raise ValueError(f"prefix must have leading dims {tuple(h.shape[:-1])} (those of h), got {tuple(prefix.shape)}")
    if weight.shape[1] != k:
        raise ValueError(f"weight must have {k} input features (prefix + h), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, like=h, like_name="h", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if compiling():
        return gelu_linear_reference(h, weight, bias, prefix)
    if not needs_autograd(h, weight, bias, prefix):
        return _gelu_linear_forward(h.contiguous(), weight, bias, prefix)
    return GeluLinearFunction.apply(h, weight, bias, prefix)

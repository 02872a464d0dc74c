"""Gated residual across a Linear: ``residual + gate[b] * linear(cat([prefix, act(x)]))``, output not saved.

Flux closes every branch with a projection followed by an AdaLN-Zero gate and the residual add:
the attention ``to_out`` / ``to_add_out``, the MLP down projections, and the single blocks'
``proj_out`` (over ``cat([attention, gelu(mlp)])``). Eager saves the projection's output ``y`` for
the gate's gradient (and GELU's output for the weight's). This Function saves only ``x`` (the
pre-activation, or the attention output that attention saves anyway), ``prefix``, ``gate`` and
the weight; backward recomputes ``act(x)`` and ``y`` (one extra matmul of forward size) and runs
the gated-residual kernel for ``gate * g`` and ``sum_s g y`` in one pass. The matmuls are
PyTorch's, the same calls eager makes, so ``y`` is bitwise the forward's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leapkernels import backend
from leapkernels.checks import check_shape, check_tensor
from leapkernels.ops._common import compiling, needs_autograd
from leapkernels.ops.gated_residual import OP as GATED_RESIDUAL
from leapkernels.ops.gelu import OP as GELU


def gated_linear_reference(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None, gelu: bool = False,
) -> torch.Tensor:
    """diffusers' arithmetic: ``residual + gate.unsqueeze(1) * linear(cat([prefix, gelu?(x)]))``."""
    a = F.gelu(x, approximate="tanh") if gelu else x
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return residual + gate.unsqueeze(1) * F.linear(a, weight, bias)


def _forward(residual, gate, x, weight, bias, prefix, gelu):
    """The forward kernels (GELU, PyTorch's matmul, gated residual); ``x`` contiguous."""
    a = backend.kernels_for(GELU, x.device).forward(x) if gelu else x
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    y = F.linear(a, weight, bias)
    return backend.kernels_for(GATED_RESIDUAL, x.device).forward(residual.contiguous(), gate.contiguous(), y)


class GatedLinearFunction(torch.autograd.Function):
    """Saves x, prefix, gate, weight, bias; never act(x), the concatenation, nor y."""

    @staticmethod
    def forward(ctx, residual, gate, x, weight, bias, prefix, gelu):
        x = x.contiguous()
        out = _forward(residual, gate, x, weight, bias, prefix, gelu)
        ctx.save_for_backward(x, prefix, gate, weight, bias)
        ctx.gelu = gelu
        return out

    @staticmethod
    def backward(ctx, g):
        x, prefix, gate, weight, bias = ctx.saved_tensors
        need_res, need_gate, need_x, need_w, need_b, need_p, _ = ctx.needs_input_grad
        gelu_k = backend.kernels_for(GELU, x.device)
        a = gelu_k.forward(x) if ctx.gelu else x
        if prefix is not None:
            a = torch.cat([prefix, a], dim=-1)
        y = F.linear(a, weight, bias) if need_gate else None
        g = g.contiguous()
        dy, dgate = backend.kernels_for(GATED_RESIDUAL, g.device).backward(
            g, gate.contiguous(), y if y is not None else g, True, need_gate
        )
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = grad_w = grad_b = grad_p = None
        if need_x or need_p:
            da = (dy2 @ weight).reshape(*dy.shape[:-1], weight.shape[1])
            if prefix is not None:
                grad_p = da[..., : prefix.shape[-1]] if need_p else None
                da = da[..., prefix.shape[-1]:]
            if need_x:
                grad_x = gelu_k.backward(da.contiguous(), x) if ctx.gelu else da
        if need_w:
            grad_w = dy2.t() @ a.reshape(-1, a.shape[-1])
        if need_b and bias is not None:
            grad_b = dy2.sum(0)
        return (g if need_res else None), dgate, grad_x, grad_w, grad_b, grad_p, None


def gated_linear(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """``residual + gate[:, None] * F.linear(cat([prefix, gelu?(x)], -1), weight, bias)``.

    ``residual``: ``[B, S, N]``; ``gate``: ``[B, N]``; ``x``: ``[B, S, K]``; ``prefix``:
    ``[B, S, P]`` or None; ``weight``: ``[N, P + K]`` (a plain tensor: call the module itself for
    LoRA-wrapped layers); ``bias``: ``[N]`` or None; ``gelu``: apply tanh-GELU to ``x`` first.
    One dtype and device for all.
    """
    check_tensor("residual", residual, ndim=3)
    check_tensor("gate", gate, like=residual, like_name="residual", ndim=2)
    check_tensor("x", x, like=residual, like_name="residual", ndim=3)
    check_tensor("weight", weight, like=residual, like_name="residual", ndim=2)
    b, s, n = residual.shape
    check_shape("gate", gate, (b, n), "(batch, features) of residual")
    if x.shape[:2] != (b, s):
        raise ValueError(f"x must have leading dims {(b, s)} (those of residual), got {tuple(x.shape)}")
    k = x.shape[-1]
    if prefix is not None:
        check_tensor("prefix", prefix, like=residual, like_name="residual", ndim=3)
        if prefix.shape[:2] != (b, s):
            raise ValueError(f"prefix must have leading dims {(b, s)} (those of residual), got {tuple(prefix.shape)}")
        k += prefix.shape[-1]
    check_shape("weight", weight, (n, k), "(residual features, prefix + x features)")
    if bias is not None:
        check_tensor("bias", bias, like=residual, like_name="residual", ndim=1)
        check_shape("bias", bias, (n,), "residual features")
    if compiling():
        return gated_linear_reference(residual, gate, x, weight, bias, prefix, bool(gelu))
    if not needs_autograd(residual, gate, x, weight, bias, prefix):
        return _forward(residual, gate, x.contiguous(), weight, bias, prefix, bool(gelu))
    return GatedLinearFunction.apply(residual, gate, x, weight, bias, prefix, bool(gelu))

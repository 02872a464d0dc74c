"""A whole gated MLP branch in one Function that saves only its input:

    out = residual + gate[b] * linear(cat([prefix, act(linear(x, w_in, b_in))]), w_out, b_out)

``act``: ``"swiglu"`` (FLUX.2's feed-forward and its single blocks' MLP half) or ``"gelu"``
(tanh-GELU: SD3's feed-forward). `gated_linear` / `gated_swiglu_linear` close a branch from its
pre-activation ``h = linear(x, w_in)`` and must save it (4-6x the model width a token); this op
starts one projection earlier and saves ``x`` (the model width) instead: backward recomputes ``h``,
the activation and the output projection (for the gate's gradient) — DESIGN §3's "LayerNorm +
modulation + the following projections save only the block input", for the MLP. Cost: the up
projection runs once more in backward (gated_linear already re-runs the down projection).

Saved for backward: ``x``, ``prefix``, ``gate`` and the weights (parameters: resident anyway).
The matmuls are PyTorch's, the activation and the gated residual the registered kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leapkernels import backend
from leapkernels.checks import check_shape, check_tensor, unit_last_stride
from leapkernels.ops._common import compiling, needs_autograd
from leapkernels.ops.gated_residual import OP as GATED_RESIDUAL
from leapkernels.ops.gelu import OP as GELU
from leapkernels.ops.swiglu import act_backward as _swiglu_backward
from leapkernels.ops.swiglu import act_forward as _swiglu
from leapkernels.ops.swiglu import swiglu_reference

ACTIVATIONS = ("swiglu", "gelu")


def gated_mlp_reference(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
    w_out: torch.Tensor, b_out: torch.Tensor | None, prefix: torch.Tensor | None = None, act: str = "swiglu",
) -> torch.Tensor:
    """diffusers' arithmetic: ``residual + gate.unsqueeze(1) * linear(cat([prefix, act(linear(x))]))``."""
    h = F.linear(x, w_in, b_in)
    a = swiglu_reference(h) if act == "swiglu" else F.gelu(h, approximate="tanh")
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return residual + gate.unsqueeze(1) * F.linear(a, w_out, b_out)


def _activation(h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "swiglu":
        return _swiglu(h)
    return backend.kernels_for(GELU, h.device).forward(h)


def _activation_backward(da: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "swiglu":
        return _swiglu_backward(da, h)
    return backend.kernels_for(GELU, h.device).backward(da.contiguous(), h)


def _branch(x, w_in, b_in, w_out, b_out, prefix, act):
    """``(a, y)``: the down projection's input ``cat([prefix, act(h)])`` and its output."""
    a = _activation(F.linear(x, w_in, b_in).contiguous(), act)
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return a, F.linear(a, w_out, b_out)


def _forward(residual, gate, x, w_in, b_in, w_out, b_out, prefix, act):
    _, y = _branch(x, w_in, b_in, w_out, b_out, prefix, act)
    return backend.kernels_for(GATED_RESIDUAL, x.device).forward(unit_last_stride(residual), unit_last_stride(gate), y)


class GatedMLPFunction(torch.autograd.Function):
    """Saves x, prefix, gate and the weights; backward recomputes h, act(h) and the projection."""

    @staticmethod
    def forward(ctx, residual, gate, x, w_in, b_in, w_out, b_out, prefix, act):
        out = _forward(residual, gate, x, w_in, b_in, w_out, b_out, prefix, act)
        ctx.save_for_backward(x, prefix, gate, w_in, b_in, w_out, b_out)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, g):
        x, prefix, gate, w_in, b_in, w_out, b_out = ctx.saved_tensors
        need = ctx.needs_input_grad
        h = F.linear(x, w_in, b_in).contiguous()
        a = _activation(h, ctx.act)
        if prefix is not None:
            a = torch.cat([prefix, a], dim=-1)
        y = F.linear(a, w_out, b_out) if need[1] else None
        g = g.contiguous()
        dy, dgate = backend.kernels_for(GATED_RESIDUAL, g.device).backward(
            g, unit_last_stride(gate), y if y is not None else g, True, need[1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        grads = [g if need[0] else None, dgate, None, None, None, None, None, None, None]
        if need[5]:
            grads[5] = dy2.t() @ a.reshape(-1, a.shape[-1])
        if need[6] and b_out is not None:
            grads[6] = dy2.sum(0)
        if not any(need[2:5]) and not need[7]:
            return tuple(grads)
        da = (dy2 @ w_out).reshape(*dy.shape[:-1], w_out.shape[1])
        if prefix is not None:
            grads[7] = da[..., : prefix.shape[-1]] if need[7] else None
            da = da[..., prefix.shape[-1]:]
        dh2 = _activation_backward(da, h, ctx.act).reshape(-1, h.shape[-1])
        if need[2]:
            grads[2] = (dh2 @ w_in).reshape(x.shape)
        if need[3]:
            grads[3] = dh2.t() @ x.reshape(-1, x.shape[-1])
        if need[4] and b_in is not None:
            grads[4] = dh2.sum(0)
        return tuple(grads)


def _check_projections(x, w_in, b_in, w_out, b_out, prefix, act, n, like) -> None:
    """w_in ``[H, K]`` (H even for SwiGLU), w_out ``[N, P + H']`` (H' = H/2 for SwiGLU), biases."""
    check_tensor("w_in", w_in, like=like, like_name="residual", ndim=2)
    check_tensor("w_out", w_out, like=like, like_name="residual", ndim=2)
    if w_in.shape[1] != x.shape[-1]:
        raise ValueError(f"w_in must have {x.shape[-1]} input features (those of x), got shape {tuple(w_in.shape)}")
    if act == "swiglu" and w_in.shape[0] % 2:
        raise ValueError(f"w_in must have an even number of outputs for SwiGLU (gate and linear halves), got {tuple(w_in.shape)}")
    hidden = w_in.shape[0] // 2 if act == "swiglu" else w_in.shape[0]
    k = hidden + (prefix.shape[-1] if prefix is not None else 0)
    check_shape("w_out", w_out, (n, k), "(residual features, prefix + activation features)")
    for name, bias, size in (("b_in", b_in, w_in.shape[0]), ("b_out", b_out, n)):
        if bias is not None:
            check_tensor(name, bias, like=like, like_name="residual", ndim=1)
            check_shape(name, bias, (size,), "the output features of its weight")


def gated_mlp(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
    w_out: torch.Tensor, b_out: torch.Tensor | None, prefix: torch.Tensor | None = None, act: str = "swiglu",
) -> torch.Tensor:
    """``residual + gate[:, None] * linear(cat([prefix, act(linear(x, w_in, b_in))]), w_out, b_out)``,
    saving only ``x`` (and ``prefix``, ``gate``).

    ``residual``: ``[B, S, N]``; ``gate``: ``[B, N]``; ``x``: ``[B, S, K]``; ``w_in``: ``[H, K]``
    (plain tensors: call the modules themselves for LoRA-wrapped layers; a row slice of a fused
    projection's weight is fine); ``w_out``: ``[N, P + H/2]`` (SwiGLU) or ``[N, P + H]`` (GELU);
    ``prefix``: ``[B, S, P]`` or None; ``act``: ``"swiglu"`` or ``"gelu"``. One dtype and device.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    check_tensor("residual", residual, ndim=3)
    check_tensor("gate", gate, like=residual, like_name="residual", ndim=2)
    check_tensor("x", x, like=residual, like_name="residual", ndim=3)
    b, s, n = residual.shape
    check_shape("gate", gate, (b, n), "(batch, features) of residual")
    if x.shape[:2] != (b, s):
        raise ValueError(f"x must have leading dims {(b, s)} (those of residual), got {tuple(x.shape)}")
    if prefix is not None:
        check_tensor("prefix", prefix, like=residual, like_name="residual", ndim=3)
        if prefix.shape[:2] != (b, s):
            raise ValueError(f"prefix must have leading dims {(b, s)} (those of residual), got {tuple(prefix.shape)}")
    _check_projections(x, w_in, b_in, w_out, b_out, prefix, act, n, residual)
    if compiling():
        return gated_mlp_reference(residual, gate, x, w_in, b_in, w_out, b_out, prefix, act)
    if not needs_autograd(residual, gate, x, w_in, b_in, w_out, b_out, prefix):
        return _forward(residual, gate, x, w_in, b_in, w_out, b_out, prefix, act)
    return GatedMLPFunction.apply(residual, gate, x, w_in, b_in, w_out, b_out, prefix, act)

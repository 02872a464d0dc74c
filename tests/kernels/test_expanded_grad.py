"""Backward from ``out.sum()``: autograd hands the op an expanded, all-zero-stride gradient.

Every backend must accept it (the native kernels check strides, the Triton ones index them) and
give the same gradients as the plain-PyTorch reference; only some operands need a gradient, so the
placeholders passed for the others are exercised too.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import leapkernels as lk
from leapkernels import backend

B, S, D = 2, 5, 9


def _backends() -> list[str]:
    names = ["reference"]
    if backend.interpreter_enabled():
        names.append("triton")
    if "native" in backend.registered("gated_residual"):
        names.append("native")
    return names


def _cases():
    gen = torch.Generator().manual_seed(0)
    x, y, v, x_true = (torch.randn(B, S, D, generator=gen) for _ in range(4))
    gate, scale, shift = (torch.randn(B, D, generator=gen) for _ in range(3))
    c = torch.randn(B, generator=gen)
    return {
        "gated_residual": (lk.gated_residual, lk.gated_residual_reference, (x, gate, y)),
        "modulated_layernorm": (lk.modulated_layernorm, lk.modulated_layernorm_reference, (x, scale, shift)),
        "gelu_tanh": (lk.gelu_tanh, lk.gelu_tanh_reference, (x,)),
        "leap_connector": (
            lambda a, b: lk.leap_connector(a, b, c, x_true)[0],
            lambda a, b: lk.leap_connector_reference(a, b, c, x_true)[0],
            (x, v),
        ),
        "grad_scale": (lambda a: lk.grad_scale(a, 0.3), lambda a: lk.grad_scale_reference(a, 0.3), (x,)),
    }


@pytest.mark.parametrize("backend_name", _backends())
@pytest.mark.parametrize("op", list(_cases()))
def test_sum_backward_with_any_subset_of_inputs_needing_grad(op, backend_name):
    fused, reference, args = _cases()[op]
    for needs in itertools.product([False, True], repeat=len(args)):
        if not any(needs):
            continue
        ins = [a.clone().requires_grad_(n) for a, n in zip(args, needs)]
        refs = [a.clone().requires_grad_(n) for a, n in zip(args, needs)]
        with backend.force_backend(backend_name):
            fused(*ins).sum().backward()
        reference(*refs).sum().backward()
        for got, want, n in zip(ins, refs, needs):
            if n:
                assert got.grad is not None and torch.isfinite(got.grad).all(), f"{op} {needs}"
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)

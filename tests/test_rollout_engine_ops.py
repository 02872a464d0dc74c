"""The fused ops in the no-grad rollout: no autograd.Function when nothing needs a gradient, and
their PyTorch references under torch.compile.

Every no-grad rollout step of a patched Flux calls ~40 fused ops with parameters that require grad
(full fine-tune) under ``torch.no_grad()``: they must run the forward kernel directly -- no ``ctx``,
nothing saved -- and give the Function's output bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels.ops import gated_linear, gated_residual, gelu, grad_scale, leap_connector, modulated_layernorm, qk_norm_rope

B, S, D, H, HD = 2, 7, 12, 2, 6


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x, y, v, xt = r(B, S, D), r(B, S, D), r(B, S, D), r(B, S, D)
    gate, scale, shift = r(B, D), r(B, D), r(B, D)
    w, bias, q, nw = r(D, D), r(D), r(B, S, H, HD), r(HD)
    cos, sin = r(S, HD), r(S, HD)
    return {
        "gated_residual": (gated_residual.GatedResidualFunction, lambda p: lk.gated_residual(x, p, y), gate),
        "gated_linear": (gated_linear.GatedLinearFunction,
                         lambda p: lk.gated_linear(x, gate, y, p, bias, None, True), w),
        "gelu_linear": (gelu.GeluLinearFunction, lambda p: lk.gelu_linear(x, p, bias), w),
        "gelu_tanh": (gelu.GeluTanhFunction, lambda p: lk.gelu_tanh(p), x),
        "modulated_layernorm": (modulated_layernorm.ModulatedLayerNormFunction,
                                lambda p: lk.modulated_layernorm(x, p, shift), scale),
        "qk_norm_rope": (qk_norm_rope.QKNormRopeFunction, lambda p: lk.qk_norm_rope(q, p, cos, sin), nw),
        "linear_qk_norm_rope": (qk_norm_rope.LinearQKNormRopeFunction,
                                lambda p: lk.linear_qk_norm_rope(x, p, None, nw, cos, sin, 1e-6, HD), w[: H * HD]),
        "leap_connector": (leap_connector.LeapConnectorFunction, lambda p: lk.leap_connector(p, v, 0.3, xt)[0], x),
        "grad_scale": (grad_scale.GradScaleFunction, lambda p: lk.grad_scale(p, 0.3), x),
    }


@pytest.mark.parametrize("op", list(_cases()))
def test_no_grad_call_skips_the_function_and_matches_it_bit_for_bit(op, monkeypatch):
    function, call, param = _cases()[op]
    param = param.clone().requires_grad_(True)  # a trainable weight, as in a full fine-tune
    with torch.enable_grad():
        want = call(param).detach()  # through the Function
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = call(param)
    assert not calls, f"{op} went through its autograd.Function under torch.no_grad()"
    assert torch.equal(got, want)
    with torch.enable_grad():
        call(param)
    assert calls, f"{op} must use its autograd.Function when an input needs a gradient"


def test_without_inputs_needing_grad_the_function_is_skipped_in_grad_mode(monkeypatch):
    calls = []
    original = gated_residual.GatedResidualFunction.apply
    monkeypatch.setattr(gated_residual.GatedResidualFunction, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(B, S, D)
    out = lk.gated_residual(x, torch.randn(B, D), torch.randn(B, S, D))
    assert not calls and not out.requires_grad


def test_compiled_patched_block_traces_the_references_in_one_graph():
    """Under torch.compile the fused ops lower to their references: one graph, no break, the same value."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(1)
    x, y, gate, scale, shift = (torch.randn(*s, generator=g) for s in ((B, S, D), (B, S, D), (B, D), (B, D), (B, D)))

    def block(x, y, gate, scale, shift):
        return lk.gated_residual(x, gate, lk.gelu_tanh(lk.modulated_layernorm(y, scale, shift)))

    with torch.no_grad():
        want = block(x, y, gate, scale, shift)
        got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, y, gate, scale, shift)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

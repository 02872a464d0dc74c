"""Op 3 (Flux block fusions) on the native C++ backend.

The bodies of the Triton/reference tests (``test_flux_ops``) run unchanged with the backend
``native``: same inputs, shapes, layouts, dtypes and tolerances (``op_harness``). The extra cases
here reach what those small shapes do not: more rows than one reduction tile (32 tokens for
d-scale/d-shift/d-gate, 64 head-rows for d-weight), a Flux-wide feature dim, and results that do
not depend on the thread count.
"""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend, native

from . import test_flux_ops as flux
from .op_harness import DTYPES, native_only, results_per_thread_count, run_and_compare

pytestmark = native_only()



def test_native_kernels_are_registered_for_every_flux_op():
    for op in ("modulated_layernorm", "gated_residual", "qk_norm_rope", "gelu_tanh"):
        assert "native" in backend.registered(op), op


# ----------------------------------------------------------------------------- the shared suite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_case,shape,layout", flux.ELEMENTWISE_CASES, ids=str)
def test_native_flux_op_matches_fp64_reference(dtype, op_case, shape, layout):
    flux.check_case(op_case, shape, layout, "cpu", "native", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["ff", "single-block"])
def test_native_gelu_linear_matches_fp64_reference(dtype, with_prefix):
    flux.test_gelu_linear_matches_fp64_reference("cpu", "native", dtype, with_prefix)


@pytest.mark.parametrize("op", list(flux._gradcheck_cases()))
def test_native_fp64_gradcheck(op):
    flux.test_fp64_gradcheck(op, "native")


# ----------------------------------------------------------------------------- beyond one tile
def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_modulation_and_gate_reduce_across_tiles(dtype):
    """97 tokens = 4 tiles of d-scale/d-shift/d-gate partials; 3,089 features (> 3 x 1,024, odd)."""
    b, s, d = 2, 97, 3 * 1024 + 17
    x = _randn(b, s, d, seed=40) * 2 + 0.3
    mod = {"x": x, "scale": _randn(b, d, seed=41), "shift": _randn(b, d, seed=42)}
    run_and_compare(
        lk.modulated_layernorm, lk.modulated_layernorm_reference, mod, grad_inputs=["x", "scale", "shift"],
        dtype=dtype, device="cpu", backend_name="native", layout="rows",
    )
    gate = {"x": x, "gate": _randn(b, d, seed=43), "y": _randn(b, s, d, seed=44)}
    run_and_compare(
        lk.gated_residual, lk.gated_residual_reference, gate, grad_inputs=["x", "gate", "y"],
        dtype=dtype, device="cpu", backend_name="native", layout="transposed",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_qk_norm_rope_reduces_d_weight_across_tiles(dtype):
    """2 x 71 x 3 = 426 head-rows (7 tiles of 64) at Flux's head dim 128, strided layout."""
    b, s, h, d = 2, 71, 3, 128
    cos, sin = flux._rope_tables(s, d)
    inputs = {"x": _randn(b, s, h, d, seed=45) * 2, "weight": 1 + 0.3 * _randn(d, seed=46), "cos": cos, "sin": sin}
    run_and_compare(
        lk.qk_norm_rope, lk.qk_norm_rope_reference, inputs, grad_inputs=["x", "weight"], dtype=dtype,
        device="cpu", backend_name="native", layout="rows", fp32_inputs=["cos", "sin"],
    )


def test_native_flux_reductions_do_not_depend_on_the_thread_count():
    """Fixed tiles combined in a fixed order: 1 and 2 threads give bit-identical gradients."""
    x = torch.randn(2, 97, 40, requires_grad=True)
    scale, shift = torch.randn(2, 40, requires_grad=True), torch.randn(2, 40, requires_grad=True)
    up = torch.randn(2, 97, 40)
    with backend.force_backend("native"):
        grads = results_per_thread_count(
            lambda: torch.autograd.grad(lk.modulated_layernorm(x, scale, shift), (x, scale, shift), up))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_native_flux_ops_reject_bad_arguments_by_name():
    ops = torch.ops.leapkernels_native
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[2, 8\]"):
        ops.mln_fwd(x, torch.randn(2, 7), torch.randn(2, 8), 1e-6, torch.empty(2, 5, 8))
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        ops.mln_fwd(x, torch.randn(2, 8), torch.randn(2, 8), 1e-6, torch.empty(8, 5, 2).transpose(0, 2))
    with pytest.raises(RuntimeError, match="gate has dtype BFloat16 but x has Float"):
        ops.gr_fwd(x, torch.randn(2, 8, dtype=torch.bfloat16), x, torch.empty(2, 5, 8))
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(RuntimeError, match="cos must be a Float CPU tensor"):
        ops.qk_fwd(q, torch.ones(8), torch.ones(5, 8, dtype=torch.float64), torch.ones(5, 8), 1e-6, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="head dim must be even"):
        ops.qk_fwd(torch.randn(1, 5, 2, 7), torch.ones(7), None, None, 1e-6, torch.empty(1, 5, 2, 7))
    with pytest.raises(RuntimeError, match="dh must be contiguous"):
        ops.gelu_bwd(x, x, torch.empty(8, 5, 2).transpose(0, 2))

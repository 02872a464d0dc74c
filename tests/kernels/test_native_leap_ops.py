"""Ops 1–2 on the native C++ backend: leap + connector + distance and gradient scaling vs fp64.

The same harness and tolerances as the Triton/reference tests (``op_harness``); the shapes add
one sample longer than three native reduction chunks (16,384 elements each), so the per-chunk
partial sums of the distance, ``d/dc`` and the gradient norm are combined across chunks.
"""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend, native

from . import test_leap_ops as leap_tests
from .op_harness import DTYPES, native_only, results_per_thread_count

pytestmark = native_only()

CHUNK = 16384  # kReduceChunk in csrc/common.h
CASES = [((1, 4, 9, 11), "transposed"), ((3, 5, 33), "rows"), ((2, 3 * CHUNK + 17), "contiguous")]


def test_native_kernels_are_registered_for_both_ops():
    assert "native" in backend.registered("leap_connector")
    assert "native" in backend.registered("grad_scale")
    assert native.status().available and native.unavailable_reason() is None


# ----------------------------------------------------------------------------- the shared suite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_native_leap_connector_matches_fp64_reference(dtype, shape, layout):
    """Connected value, distance, and grads of x_from, v and a per-sample c, all vs fp64."""
    leap_tests.test_leap_connector_matches_fp64_reference("cpu", "native", dtype, shape, layout)


@pytest.mark.parametrize("c_kind", ["scalar", "tensor0d", "per_sample"])
def test_native_leap_matches_fp64_reference(c_kind):
    """The leap alone (no connector) with every form of c, every dtype."""
    leap_tests.test_leap_matches_fp64_reference("cpu", "native", c_kind)


def test_native_connector_value_is_exactly_x_true_and_gradient_goes_to_leap():
    leap_tests.test_connector_value_is_exactly_x_true_and_gradient_goes_to_leap("native")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("max_norm", [None, 3.0])
def test_native_grad_scale_matches_fp64_reference(dtype, shape, layout, max_norm):
    leap_tests.test_grad_scale_matches_fp64_reference("cpu", "native", dtype, shape, layout, max_norm)


def test_native_distance_is_mean_abs_difference_in_fp32():
    leap_tests.test_distance_is_mean_abs_difference_in_fp32("native")


def test_native_distance_of_fp64_latents_is_fp64():
    leap_tests.test_distance_of_fp64_latents_is_fp64("native")


# ----------------------------------------------------------------------------- native only
def test_native_leap_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    c = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    with backend.force_backend("native"):
        assert torch.autograd.gradcheck(lk.leap, (x, v, c))


def test_native_grad_scale_cap_binds_only_where_the_norm_exceeds_it():
    x = torch.zeros(2, 3 * CHUNK + 5, requires_grad=True)
    up = torch.ones(2, 3 * CHUNK + 5)
    up[1] *= 1e-4  # norm ~0.022 < 1 after alpha = 2
    with backend.force_backend("native"):
        (gx,) = torch.autograd.grad(lk.grad_scale(x, 2.0, max_norm=1.0), x, up)
    assert abs(gx[0].double().norm().item() - 1.0) < 1e-6
    assert torch.allclose(gx[1], up[1] * 2.0)


def test_native_reductions_do_not_depend_on_the_thread_count():
    """Fixed-size chunks combined in a fixed order: 1 and 2 threads give bit-identical results."""
    g = torch.Generator().manual_seed(6)
    x, v, t = (torch.randn(2, 3 * CHUNK + 11, generator=g) for _ in range(3))
    c = torch.tensor([0.3, -0.7])
    with backend.force_backend("native"):
        results = results_per_thread_count(lambda: lk.leap_connector(x, v, c, t)[1])
    assert torch.equal(results[0], results[1])


def test_native_ops_reject_bad_arguments_by_name():
    """The C++ checks name the argument (reached only by calling the raw ops directly)."""
    ops = torch.ops.leapkernels_native
    x = torch.randn(2, 8)
    out = torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="c must be a contiguous Float CPU tensor of shape \\[2\\]"):
        ops.leap_connector_fwd(x, x, torch.ones(3), x, out)
    with pytest.raises(RuntimeError, match="x_true has dtype Double but x_from has Float"):
        ops.leap_connector_fwd(x, x, torch.ones(2), x.double(), out)
    with pytest.raises(RuntimeError, match="v must have shape"):
        ops.leap_fwd(x, torch.randn(2, 9), torch.ones(2), out)
    with pytest.raises(RuntimeError, match="grad_v must be contiguous"):
        ops.leap_bwd(x, torch.ones(2), torch.empty(8, 2).t())
    with pytest.raises(RuntimeError, match="max_norm must be positive"):
        ops.grad_scale_bwd(x, torch.ones(2), -1.0, out)

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

from .op_harness import DTYPES, rel_err, run_and_compare

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native backend absent: {native.unavailable_reason()}")


@pytest.fixture(autouse=True)
def native_registered():
    """Native joins the registry for these tests only (other tests see the registry they expect)."""
    native.register_all()
    yield
    native.unregister_all()

CHUNK = 16384  # kReduceChunk in csrc/common.h
CASES = [((1, 4, 9, 11), "transposed"), ((3, 5, 33), "rows"), ((2, 3 * CHUNK + 17), "contiguous")]


def _leap_inputs(shape, c_kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = {"scalar": -0.37, "tensor0d": torch.tensor(0.6, dtype=torch.float64),
         "per_sample": torch.rand(shape[0], generator=g, dtype=torch.float64) - 1.2}[c_kind]
    return {
        "x_from": torch.randn(shape, generator=g, dtype=torch.float64),
        "v": torch.randn(shape, generator=g, dtype=torch.float64),
        "c": c,
        "x_true": torch.randn(shape, generator=g, dtype=torch.float64),
    }


def test_native_kernels_are_registered_for_both_ops():
    assert "native" in backend.registered("leap_connector")
    assert "native" in backend.registered("grad_scale")
    assert native.status().available and native.unavailable_reason() is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_native_leap_connector_matches_fp64_reference(dtype, shape, layout):
    """Connected value, distance, and grads of x_from, v and a per-sample c, all vs fp64."""
    run_and_compare(
        lk.leap_connector, lk.leap_connector_reference, _leap_inputs(shape, "per_sample", 1),
        grad_inputs=["x_from", "v", "c"], dtype=dtype, device="cpu", backend_name="native", layout=layout,
    )


@pytest.mark.parametrize("c_kind", ["scalar", "tensor0d", "per_sample"])
def test_native_leap_matches_fp64_reference(c_kind):
    """The leap alone (no connector) with every form of c, every dtype."""
    inputs = _leap_inputs((3, 7, 13), c_kind, 2)
    inputs.pop("x_true")
    grads = ["x_from", "v"] + (["c"] if c_kind != "scalar" else [])

    def reference(x_from, v, c):
        return lk.leap_connector_reference(x_from, v, c, None)[0]

    for dtype in DTYPES:
        run_and_compare(lk.leap, reference, inputs, grad_inputs=grads, dtype=dtype, device="cpu", backend_name="native")


def test_native_leap_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    c = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    with backend.force_backend("native"):
        assert torch.autograd.gradcheck(lk.leap, (x, v, c))


def test_native_connector_value_is_exactly_x_true_and_gradient_goes_to_leap():
    g = torch.Generator().manual_seed(4)
    x, v, t = (torch.randn(2, 65, generator=g, dtype=torch.bfloat16) for _ in range(3))
    x.requires_grad_(True)
    v.requires_grad_(True)
    c = torch.tensor([0.5, -2.0])
    with backend.force_backend("native"):
        out, dist = lk.leap_connector(x, v, c, t)
        assert torch.equal(out, t) and not dist.requires_grad and dist.dtype == torch.float32
        up = torch.randn(out.shape, generator=g).to(torch.bfloat16)
        gx, gv = torch.autograd.grad(out, (x, v), up)
    assert torch.equal(gx, up)
    assert torch.equal(gv, (up.float() * c[:, None]).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("max_norm", [None, 3.0])
def test_native_grad_scale_matches_fp64_reference(dtype, shape, layout, max_norm):
    g = torch.Generator().manual_seed(5)
    inputs = {
        "x": torch.randn(shape, generator=g, dtype=torch.float64),
        "alpha": torch.rand(shape[0], generator=g, dtype=torch.float64) * 2 - 0.5,
    }
    run_and_compare(
        lk.grad_scale, lk.grad_scale_reference, inputs, grad_inputs=["x"], dtype=dtype, device="cpu",
        backend_name="native", layout=layout, extra={"max_norm": max_norm},
    )


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
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with backend.force_backend("native"):
                results.append(lk.leap_connector(x, v, c, t)[1])
    finally:
        torch.set_num_threads(threads)
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


def test_native_distance_is_mean_abs_difference_in_fp32():
    x, v, t = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    with backend.force_backend("native"):
        _, dist = lk.leap_connector(x, v, torch.tensor([1.0, 2.0]), t)
    assert rel_err(dist, torch.tensor([1.0, 2.0])) < 1e-7

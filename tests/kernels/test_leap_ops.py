"""Ops 1–2: leap + connector + distance, and per-sample gradient scaling, against fp64 references."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend

from .op_harness import DTYPES, backends_under_test, cuda_or_skip, rel_err, run_and_compare

# batch 1 and > 1, sizes that are no block multiple, each with a memory layout
CASES = [((1, 4, 9, 11), "transposed"), ((3, 5, 33), "rows"), ((2, 2**10 + 17), "contiguous")]


def _inputs(shape, c_kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    c = {"scalar": -0.37, "tensor0d": torch.tensor(0.6, dtype=torch.float64),
         "per_sample": torch.rand(b, generator=g, dtype=torch.float64) - 1.2}[c_kind]
    return {
        "x_from": torch.randn(shape, generator=g, dtype=torch.float64),
        "v": torch.randn(shape, generator=g, dtype=torch.float64),
        "c": c,
        "x_true": torch.randn(shape, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_leap_connector_matches_fp64_reference(device, backend_name, dtype, shape, layout):
    """Connected value, distance, and grads of x_from, v and a per-sample c, all vs fp64."""
    cuda_or_skip(device)
    run_and_compare(
        lk.leap_connector, lk.leap_connector_reference, _inputs(shape, "per_sample", 1),
        grad_inputs=["x_from", "v", "c"], dtype=dtype, device=device, backend_name=backend_name, layout=layout,
    )


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("c_kind", ["scalar", "tensor0d", "per_sample"])
def test_leap_matches_fp64_reference(device, backend_name, c_kind):
    """The leap alone (no connector), with every form of c."""
    cuda_or_skip(device)
    inputs = _inputs((3, 7, 13), c_kind, 2)
    inputs.pop("x_true")
    grads = ["x_from", "v"] + (["c"] if c_kind != "scalar" else [])

    def reference(x_from, v, c):
        return lk.leap_connector_reference(x_from, v, c, None)[0]

    for dtype in DTYPES:
        run_and_compare(lk.leap, reference, inputs, grad_inputs=grads, dtype=dtype, device=device, backend_name=backend_name)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_leap_gradcheck_fp64(backend_name):
    """The leap's analytic gradient equals finite differences in fp64 (the connector's value does
    not depend on the leap, so its Jacobian is checked against the leap's in the test above)."""
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    c = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    with backend.force_backend(backend_name):
        assert torch.autograd.gradcheck(lk.leap, (x, v, c), fast_mode=True)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_connector_value_is_exactly_x_true_and_gradient_goes_to_leap(backend_name):
    """(native: test_native_leap_ops runs this body with backend "native".) Straight-through: the value is x_true bit for bit; d/dx_from = I and d/dv = c per sample."""
    g = torch.Generator().manual_seed(4)
    x, v, t = (torch.randn(2, 65, generator=g, dtype=torch.bfloat16) for _ in range(3))
    x.requires_grad_(True)
    v.requires_grad_(True)
    c = torch.tensor([0.5, -2.0])
    with backend.force_backend(backend_name):
        out, dist = lk.leap_connector(x, v, c, t)
        assert torch.equal(out, t) and not dist.requires_grad and dist.dtype == torch.float32
        up = torch.randn(out.shape, generator=g).to(torch.bfloat16)
        gx, gv = torch.autograd.grad(out, (x, v), up)
    assert torch.equal(gx, up)
    assert torch.equal(gv, (up.float() * c[:, None]).to(torch.bfloat16))


# ----------------------------------------------------------------------------- grad_scale
def _scale_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(shape, generator=g, dtype=torch.float64),
        "alpha": torch.rand(shape[0], generator=g, dtype=torch.float64) * 2 - 0.5,
    }


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("max_norm", [None, 3.0])
def test_grad_scale_matches_fp64_reference(device, backend_name, dtype, shape, layout, max_norm):
    """Identity forward; alpha-scaled, norm-capped backward, per sample, vs fp64."""
    cuda_or_skip(device)
    run_and_compare(
        lk.grad_scale, lk.grad_scale_reference, _scale_inputs(shape, 5), grad_inputs=["x"], dtype=dtype,
        device=device, backend_name=backend_name, layout=layout,
        extra={"max_norm": max_norm},
    )


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_grad_scale_cap_binds_only_where_the_norm_exceeds_it(backend_name):
    """A sample whose scaled gradient norm is above max_norm ends exactly at it; one below is untouched."""
    x = torch.zeros(2, 37, requires_grad=True)
    up = torch.ones(2, 37)
    up[1] *= 0.01  # norm 0.0608 < 1
    with backend.force_backend(backend_name):
        (gx,) = torch.autograd.grad(lk.grad_scale(x, 2.0, max_norm=1.0), x, up)
    assert abs(gx[0].norm().item() - 1.0) < 1e-6
    assert torch.allclose(gx[1], up[1] * 2.0)


def test_grad_scale_forward_is_a_view_without_copy():
    x = torch.randn(2, 8, requires_grad=True)
    assert lk.grad_scale(x, 0.3).data_ptr() == x.data_ptr()


# ----------------------------------------------------------------------------- bad input
def test_leap_connector_bad_input_names_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="v must have shape"):
        lk.leap_connector(x, torch.randn(2, 9), 0.5, x)
    with pytest.raises(TypeError, match="x_true has dtype"):
        lk.leap_connector(x, x, 0.5, x.double())
    with pytest.raises(ValueError, match="c must be a scalar or have shape"):
        lk.leap_connector(x, x, torch.ones(3), x)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        lk.leap_connector(x, [1.0], 0.5, x)
    with pytest.raises(ValueError, match="x_true must be a tensor"):
        lk.leap_connector(x, x, 0.5, None)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="v is on cuda"):
            lk.leap_connector(x, x.cuda(), 0.5, x)


def test_grad_scale_bad_input_names_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        lk.grad_scale(x, torch.ones(3))
    with pytest.raises(ValueError, match="max_norm must be a positive"):
        lk.grad_scale(x, 0.5, max_norm=-1.0)
    with pytest.raises(TypeError, match="alpha must be a float or a tensor"):
        lk.grad_scale(x, "0.5")


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_distance_is_mean_abs_difference_in_fp32(backend_name):
    x, v, t = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    with backend.force_backend(backend_name):
        _, dist = lk.leap_connector(x, v, torch.tensor([1.0, 2.0]), t)
    assert dist.dtype == torch.float32
    assert rel_err(dist, torch.tensor([1.0, 2.0])) < 1e-7


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_distance_of_fp64_latents_is_fp64(backend_name):
    """fp64 latents: the distance is accumulated and returned in fp64 (agrees with fp64 to 1e-15,
    where an fp32 distance would stop at ~1e-7)."""
    g = torch.Generator().manual_seed(8)
    x, v, t = (torch.randn(3, 2 * 4096 + 7, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)
    with backend.force_backend(backend_name):
        _, dist = lk.leap_connector(x, v, c, t)
    truth = (t - (x + c[:, None] * v)).abs().mean(1)
    assert dist.dtype == torch.float64
    assert rel_err(dist, truth) < 1e-14

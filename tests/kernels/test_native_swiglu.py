"""The SwiGLU op on the native C++ backend: the bodies of the Triton/reference tests
(``test_swiglu_ops``) and the fuzz (``test_fuzz_swiglu``) run unchanged with the backend ``native``
(same inputs, shapes, layouts, dtypes and tolerances); plus FLUX.2-wide rows, the strided MLP half
of the single blocks, and bad arguments named."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend, native

from . import test_fuzz_swiglu as fuzz
from . import test_swiglu_ops as sw
from .op_harness import DTYPES, native_only, run_and_compare

pytestmark = native_only()


def test_native_swiglu_is_registered_and_the_library_has_every_op():
    assert "native" in backend.registered("swiglu")
    assert native.missing_ops() == ()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", sw.SWIGLU_CASES, ids=str)
def test_native_swiglu_matches_fp64_reference(dtype, shape, layout):
    sw.check_swiglu(shape, layout, "cpu", "native", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["ff", "single-block"])
def test_native_swiglu_linear_and_gated_swiglu_linear_match_fp64_reference(dtype, with_prefix):
    sw.check_swiglu_linear("cpu", "native", dtype, with_prefix)
    sw.check_gated_swiglu_linear("cpu", "native", dtype, with_prefix)


@pytest.mark.parametrize("op", list(sw._gradcheck_cases()))
def test_native_fp64_gradcheck(op):
    sw.test_fp64_gradcheck(op, "native")


@pytest.mark.parametrize("name", list(fuzz.FUZZ))
def test_native_fuzz(name):
    fuzz.FUZZ[name]("native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_swiglu_on_flux2_wide_rows_and_the_strided_mlp_half(dtype):
    """Halves of 2 x 3,072 + 17 (odd, wider than any vector tail), and the MLP half of a fused
    qkv + mlp projection (row stride 3 x 40 + 2 x 45): read in place."""
    run_and_compare(lk.swiglu, lk.swiglu_reference, {"h": sw._randn(1, 3, 2 * (3 * 1024 + 17), seed=40) * 3},
                    grad_inputs=["h"], dtype=dtype, device="cpu", backend_name="native", layout="rows")
    big = (sw._randn(2, 7, 3 * 40 + 2 * 45, seed=41) * 2).to(dtype)
    h = big[..., 3 * 40:]
    with backend.force_backend("native"):
        out = lk.swiglu(h)
    ref = lk.swiglu_reference(h.double())
    assert (out.double() - ref).abs().max() <= (1e-6 if dtype == torch.float32 else 2**-7) * ref.abs().max()


def test_native_swiglu_rejects_bad_arguments_by_name():
    ops = torch.ops.leapkernels_native
    with pytest.raises(RuntimeError, match="h's last dim must be even"):
        ops.swiglu_fwd(torch.randn(3, 7), torch.empty(3, 3))
    with pytest.raises(RuntimeError, match=r"out must have shape \[3, 4\]"):
        ops.swiglu_fwd(torch.randn(3, 8), torch.empty(3, 5))
    with pytest.raises(RuntimeError, match="out has dtype BFloat16 but h has Float"):
        ops.swiglu_fwd(torch.randn(3, 8), torch.empty(3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="h must have unit column stride"):
        ops.swiglu_fwd(torch.randn(8, 3).t(), torch.empty(3, 4))
    with pytest.raises(RuntimeError, match="dh must be contiguous"):
        ops.swiglu_bwd(torch.randn(3, 4), torch.randn(3, 8), torch.empty(8, 3).t())
    with pytest.raises(RuntimeError, match=r"grad must have shape \[3, 4\]"):
        ops.swiglu_bwd(torch.randn(3, 5), torch.randn(3, 8), torch.empty(3, 8))


def test_a_stale_library_leaves_its_missing_ops_to_the_other_backends(monkeypatch):
    """A library built before an op existed lacks its functions: the op is not registered as native
    (auto then picks another backend) and `missing_ops` names it, instead of failing at the call."""
    native.unregister_all()
    monkeypatch.setitem(native.LIBRARY_OPS, "swiglu", ("swiglu_fwd", "swiglu_from_the_future"))
    assert native.missing_ops() == ("swiglu",)
    assert "swiglu" not in native.register_all() and "native" not in backend.registered("swiglu")
    assert "native" in backend.registered("modulated_layernorm")
    h = torch.randn(2, 3, 8, requires_grad=True)
    with backend.force_backend("auto"):
        assert torch.equal(lk.swiglu(h), lk.swiglu(h))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,prefix", [("swiglu", 0), ("swiglu", 6), ("gelu", 0)], ids=["flux2-ff", "flux2-single", "sd3-ff"])
def test_native_gated_mlp_matches_fp64_reference(dtype, act, prefix):
    """The whole-MLP op on the native activation and gated-residual kernels."""
    from . import test_gated_mlp_ops

    test_gated_mlp_ops.check_gated_mlp("cpu", "native", dtype, act, prefix)

"""The SwiGLU op (FLUX.2's feed-forward): alone, with its down projection, closing a gated residual;
forward and backward against fp64 references (DESIGN §4 rules), fp64 gradcheck, what is saved."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend
from leapkernels.ops import _common

from .op_harness import DTYPES, backends_under_test, cuda_or_skip, run_and_compare


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# batch 1 and > 1, odd halves (not multiples of a block), strided rows and transposed storage
SWIGLU_CASES = [((1, 7, 2 * 33), "transposed"), ((3, 5, 2 * 65), "rows"), ((2, 2 * (2**7 + 17)), "contiguous")]


def check_swiglu(shape, layout, device, backend_name, dtype) -> None:
    """One swiglu case through the harness (the native tests call it with backend "native")."""
    run_and_compare(lk.swiglu, lk.swiglu_reference, {"h": _randn(*shape, seed=1) * 3}, grad_inputs=["h"],
                    dtype=dtype, device=device, backend_name=backend_name, layout=layout)


def check_swiglu_linear(device, backend_name, dtype, with_prefix) -> None:
    p = 6 if with_prefix else 0
    inputs = {"h": _randn(2, 9, 2 * 21, seed=2) * 2, "weight": _randn(13, p + 21, seed=3) / 5, "bias": _randn(13, seed=4)}
    if with_prefix:
        inputs["prefix"] = _randn(2, 9, p, seed=5)
    run_and_compare(lk.swiglu_linear, lk.swiglu_linear_reference, inputs, grad_inputs=list(inputs), dtype=dtype,
                    device=device, backend_name=backend_name, layout="transposed")


def check_gated_swiglu_linear(device, backend_name, dtype, with_prefix) -> None:
    b, s, k, n, p = 2, 9, 19, 13, (6 if with_prefix else 0)
    inputs = {"residual": _randn(b, s, n, seed=6), "gate": _randn(b, n, seed=7), "h": _randn(b, s, 2 * k, seed=8) * 2,
              "weight": _randn(n, p + k, seed=9) / 5, "bias": _randn(n, seed=10)}
    if with_prefix:
        inputs["prefix"] = _randn(b, s, p, seed=11)
    run_and_compare(lk.gated_swiglu_linear, lk.gated_swiglu_linear_reference, inputs, grad_inputs=list(inputs),
                    dtype=dtype, device=device, backend_name=backend_name, layout="rows")


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SWIGLU_CASES, ids=str)
def test_swiglu_matches_fp64_reference(device, backend_name, dtype, shape, layout):
    cuda_or_skip(device)
    check_swiglu(shape, layout, device, backend_name, dtype)


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["ff", "single-block"])
def test_swiglu_linear_matches_fp64_reference(device, backend_name, dtype, with_prefix):
    """SwiGLU + down projection, alone (double-block feed-forward) and after a prefix (single block)."""
    cuda_or_skip(device)
    check_swiglu_linear(device, backend_name, dtype, with_prefix)


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["ff", "single-block"])
def test_gated_swiglu_linear_matches_fp64_reference(device, backend_name, dtype, with_prefix):
    """residual + gate * linear(cat([prefix, swiglu(h)])): FLUX.2's FF and single-block closings."""
    cuda_or_skip(device)
    check_gated_swiglu_linear(device, backend_name, dtype, with_prefix)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_reads_a_strided_view_without_copying(backend_name, dtype):
    """The single blocks' MLP half is a view of to_qkv_mlp_proj's output (row stride 9 x width): the
    op saves that view (same storage, nothing copied) and matches the reference on it."""
    big = (_randn(2, 5, 3 * 8 + 2 * 24, seed=12) * 2).to(dtype).requires_grad_(True)
    h = big[..., 3 * 8:]
    w, pre = _randn(11, 8 + 24, seed=13).to(dtype), _randn(2, 5, 8, seed=14).to(dtype)
    saved = []
    with backend.force_backend(backend_name), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        out = lk.swiglu_linear(h, w, None, pre)
    assert any(t.untyped_storage().data_ptr() == big.untyped_storage().data_ptr() for t in saved)
    assert all(t.untyped_storage().data_ptr() != big.untyped_storage().data_ptr() or t.shape == h.shape for t in saved)
    ref = lk.swiglu_linear_reference(h.double(), w.double(), None, pre.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    (g,) = torch.autograd.grad(out, big, torch.ones_like(out))
    assert torch.equal(g[..., : 3 * 8], torch.zeros_like(g[..., : 3 * 8]))


# ----------------------------------------------------------------------------- fp64 gradcheck
def _gradcheck_cases():
    return {
        "swiglu": (lk.swiglu, (_randn(2, 3, 10, seed=20),)),
        "swiglu_linear": (lambda h, w, b, pre: lk.swiglu_linear(h, w, b, pre),
                          (_randn(2, 3, 10, seed=21), _randn(4, 7, seed=22), _randn(4, seed=23), _randn(2, 3, 2, seed=24))),
        "gated_swiglu_linear": (lambda r, g, h, w, b, pre: lk.gated_swiglu_linear(r, g, h, w, b, pre),
                                (_randn(2, 3, 4, seed=25), _randn(2, 4, seed=26), _randn(2, 3, 10, seed=27),
                                 _randn(4, 7, seed=28), _randn(4, seed=29), _randn(2, 3, 2, seed=30))),
    }


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("op", list(_gradcheck_cases()))
def test_fp64_gradcheck(op, backend_name):
    fn, args = _gradcheck_cases()[op]
    args = tuple(a.clone().requires_grad_(True) for a in args)
    with backend.force_backend(backend_name):
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)


# ----------------------------------------------------------------------------- what is saved
def _saved_shapes(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    return sorted(tuple(t.shape) for t in saved)


def test_swiglu_saves_only_its_input():
    h = torch.randn(2, 9, 40, requires_grad=True)
    assert _saved_shapes(lk.swiglu, h) == [(2, 9, 40)]


def test_swiglu_linear_saves_the_pre_activation_not_the_activation():
    h, w, pre = torch.randn(2, 9, 40, requires_grad=True), torch.randn(13, 26, requires_grad=True), torch.randn(2, 9, 6)
    assert _saved_shapes(lk.swiglu_linear, h, w, None, pre) == sorted([(2, 9, 40), (13, 26), (2, 9, 6)])


def test_gated_swiglu_linear_saves_neither_activation_nor_projection():
    r, h, w = torch.randn(2, 9, 13, requires_grad=True), torch.randn(2, 9, 40, requires_grad=True), torch.randn(13, 20)
    g = torch.randn(2, 13, requires_grad=True)
    assert _saved_shapes(lk.gated_swiglu_linear, r, g, h, w) == sorted([(2, 9, 40), (2, 13), (13, 20)])


# ----------------------------------------------------------------------------- bad input, wide rows
def test_swiglu_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="h's last dim must be even"):
        lk.swiglu(torch.randn(2, 7))
    with pytest.raises(TypeError, match="h must be a floating tensor"):
        lk.swiglu(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must have 26 input features"):
        lk.swiglu_linear(torch.randn(2, 40), torch.randn(13, 20), None, torch.randn(2, 6))
    with pytest.raises(ValueError, match="prefix must have leading dims"):
        lk.swiglu_linear(torch.randn(2, 40), torch.randn(13, 26), None, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 13\)"):
        lk.gated_swiglu_linear(torch.randn(2, 9, 13), torch.randn(2, 12), torch.randn(2, 9, 40), torch.randn(13, 20))
    with pytest.raises(ValueError, match="weight must have 13 output features"):
        lk.gated_swiglu_linear(torch.randn(2, 9, 13), torch.randn(2, 13), torch.randn(2, 9, 40), torch.randn(12, 20))
    with pytest.raises(TypeError, match="weight has dtype"):
        lk.swiglu_linear(torch.randn(2, 40), torch.randn(13, 20, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_walks_rows_wider_than_one_column_chunk(monkeypatch, dtype):
    """Halves wider than MAX_BLOCK_D (FLUX.2-dev: 18,432): chunks of 32, 32 and 13 here."""
    monkeypatch.setattr(_common, "MAX_BLOCK_D", 32)
    _, block_d, _, _ = _common.row_launch(1, 6, 77, torch.device("cpu"))
    assert block_d < 77
    check_swiglu((2, 3, 2 * 77), "rows", "cpu", "triton", dtype)


# ----------------------------------------------------------------------------- no-grad rollout, torch.compile
def _no_grad_cases():
    from leapkernels.ops import swiglu as sw

    g = torch.Generator().manual_seed(0)
    r, h, w = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 12, generator=g), torch.randn(5, 6, generator=g)
    gate, pre = torch.randn(2, 5, generator=g), torch.randn(2, 7, 2, generator=g)
    return {
        "swiglu": (sw.SwiGLUFunction, lambda p: lk.swiglu(p), h),
        "swiglu_linear": (sw.SwiGLULinearFunction, lambda p: lk.swiglu_linear(h, p, None, pre), torch.randn(5, 8)),
        "gated_swiglu_linear": (sw.GatedSwiGLULinearFunction, lambda p: lk.gated_swiglu_linear(r, gate, h, p), w),
    }


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("op", list(_no_grad_cases()))
def test_no_grad_call_skips_the_function_and_matches_it_bit_for_bit(op, backend_name, monkeypatch):
    """The no-grad rollout (a trainable weight under torch.no_grad()): the forward kernels run
    directly (no ctx, nothing saved), bit for bit the Function's output."""
    function, call, param = _no_grad_cases()[op]
    param = param.clone().requires_grad_(True)
    with backend.force_backend(backend_name):
        with torch.enable_grad():
            want = call(param).detach()
        calls = []
        original = function.apply
        monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            got = call(param)
        assert not calls and torch.equal(got, want)
        with torch.enable_grad():
            call(param)
        assert calls


def test_compiled_swiglu_ops_trace_their_references_in_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(1)
    r, gate, h, w = (torch.randn(*s, generator=g) for s in ((2, 7, 5), (2, 5), (2, 7, 12), (5, 6)))

    def ff(r, gate, h, w):
        return lk.gated_swiglu_linear(r, gate, h, w) + lk.swiglu_linear(h, w) + lk.swiglu(h).sum(-1, keepdim=True)

    with torch.no_grad():
        want = ff(r, gate, h, w)
        got = torch.compile(ff, backend="aot_eager", fullgraph=True)(r, gate, h, w)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

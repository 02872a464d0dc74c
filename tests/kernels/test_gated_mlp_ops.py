"""gated_mlp: a whole gated MLP branch (up projection, SwiGLU or tanh-GELU, down projection, gate,
residual) saving only its input; forward and backward against fp64 references (DESIGN §4 rules),
fp64 gradcheck, what is saved, the no-grad path, bad input."""
from __future__ import annotations

import pytest
import torch

from leapkernels import backend
from leapkernels.ops.gated_mlp import GatedMLPFunction, gated_mlp, gated_mlp_reference

from .op_harness import DTYPES, backends_under_test, cuda_or_skip, run_and_compare


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(act: str, prefix: int, b=2, s=9, k=13, hidden=22, n=11, seed=0) -> dict:
    width = hidden // 2 if act == "swiglu" else hidden
    inputs = {"residual": _randn(b, s, n, seed=seed), "gate": _randn(b, n, seed=seed + 1), "x": _randn(b, s, k, seed=seed + 2),
              "w_in": _randn(hidden, k, seed=seed + 3) / 3, "b_in": _randn(hidden, seed=seed + 4),
              "w_out": _randn(n, prefix + width, seed=seed + 5) / 4, "b_out": _randn(n, seed=seed + 6)}
    if prefix:
        inputs["prefix"] = _randn(b, s, prefix, seed=seed + 7)
    return inputs


def check_gated_mlp(device, backend_name, dtype, act, prefix, layout="rows") -> None:
    inputs = _inputs(act, prefix)
    run_and_compare(gated_mlp, gated_mlp_reference, inputs, grad_inputs=list(inputs), dtype=dtype, device=device,
                    backend_name=backend_name, layout=layout, extra={"act": act})


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,prefix", [("swiglu", 0), ("swiglu", 6), ("gelu", 0)], ids=["flux2-ff", "flux2-single", "sd3-ff"])
def test_gated_mlp_matches_fp64_reference(device, backend_name, dtype, act, prefix):
    cuda_or_skip(device)
    check_gated_mlp(device, backend_name, dtype, act, prefix)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("act,prefix", [("swiglu", 2), ("gelu", 0)])
def test_fp64_gradcheck(backend_name, act, prefix):
    inputs = _inputs(act, prefix, b=2, s=3, k=4, hidden=6, n=3, seed=20)
    names = list(inputs)
    args = tuple(inputs[k].clone().requires_grad_(True) for k in names)

    def fn(*a):
        return gated_mlp(**dict(zip(names, a)), act=act)

    with backend.force_backend(backend_name):
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_gated_mlp_saves_its_input_not_the_pre_activation():
    inputs = {k: v.float().requires_grad_(True) for k, v in _inputs("swiglu", 6).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_mlp(**inputs, act="swiglu")
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(2, 9, 13), (2, 9, 6), (2, 11), (22, 13), (22,), (11, 17), (11,)]), shapes


def test_gated_mlp_reads_a_row_slice_of_a_fused_projection_weight():
    """FLUX.2's single blocks: w_in is the MLP rows of to_qkv_mlp_proj's weight (a view)."""
    inputs = {k: v.float() for k, v in _inputs("swiglu", 6).items()}
    fused = torch.cat([torch.randn(9, 13), inputs["w_in"]]).requires_grad_(True)
    inputs["w_in"] = fused[9:]
    want = gated_mlp_reference(**inputs, act="swiglu")
    got = gated_mlp(**inputs, act="swiglu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), fused)
    (g_ref,) = torch.autograd.grad(want.sum(), fused)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(g[:9], torch.zeros_like(g[:9]))


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_no_grad_call_skips_the_function_and_matches_it_bit_for_bit(act, monkeypatch):
    inputs = {k: v.float() for k, v in _inputs(act, 0).items()}
    inputs["w_in"].requires_grad_(True)
    with torch.enable_grad():
        want = gated_mlp(**inputs, act=act).detach()
    calls = []
    original = GatedMLPFunction.apply
    monkeypatch.setattr(GatedMLPFunction, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = gated_mlp(**inputs, act=act)
    assert not calls and torch.equal(got, want)


def test_gated_mlp_bad_input_names_the_argument():
    base = {k: v.float() for k, v in _inputs("swiglu", 0).items()}
    with pytest.raises(ValueError, match="act must be one of"):
        gated_mlp(**base, act="relu")
    with pytest.raises(ValueError, match="w_in must have 13 input features"):
        gated_mlp(**{**base, "w_in": torch.randn(22, 12)}, act="swiglu")
    with pytest.raises(ValueError, match="w_in must have an even number of outputs"):
        gated_mlp(**{**base, "w_in": torch.randn(21, 13), "b_in": None}, act="swiglu")
    with pytest.raises(ValueError, match=r"w_out must have shape \(11, 11\)"):
        gated_mlp(**{**base, "w_out": torch.randn(11, 22)}, act="swiglu")
    with pytest.raises(ValueError, match=r"b_in must have shape \(22,\)"):
        gated_mlp(**{**base, "b_in": torch.randn(21)}, act="swiglu")
    with pytest.raises(TypeError, match="x has dtype"):
        gated_mlp(**{**base, "x": base["x"].double()}, act="swiglu")

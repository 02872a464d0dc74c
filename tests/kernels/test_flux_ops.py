"""Op 3: the Flux block fusions, forward and backward, against fp64 references (DESIGN §4 rules)."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend
from leapkernels.ops import _common

from .op_harness import DTYPES, backends_under_test, cuda_or_skip, run_and_compare


def _randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rope_tables(seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as FluxPosEmbed builds them: frequencies repeated twice (repeat_interleave_real)."""
    pos = torch.arange(seq, dtype=torch.float64)[:, None] * 0.73 + 0.2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = (pos * freqs).repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


# (shape, layout): batch 1 and > 1, odd sizes, strided batch rows and transposed storage
MLN_CASES = [((1, 7, 33), "transposed"), ((3, 37, 48), "rows"), ((2, 5, 130), "contiguous")]
QK_CASES = [((1, 5, 3, 16), "transposed"), ((2, 11, 2, 34), "rows")]
GELU_CASES = [((3, 5, 129), "transposed"), ((1, 2**10 + 17), "rows")]


def _modulated_layernorm_case(shape):
    b, _, d = shape
    inputs = {"x": _randn(*shape, seed=1) * 3 + 0.5, "scale": _randn(b, d, seed=2), "shift": _randn(b, d, seed=3)}
    return lk.modulated_layernorm, lk.modulated_layernorm_reference, inputs, ["x", "scale", "shift"], {}


def _ada_layernorm_continuous_case(shape):
    """AdaLayerNormContinuous's chunk order is (scale, shift): swapped chunks would fail here."""
    inputs = {"x": _randn(*shape, seed=4), "emb": _randn(shape[0], 2 * shape[2], seed=5)}
    return lk.ada_layernorm_continuous, lk.ada_layernorm_continuous_reference, inputs, ["x", "emb"], {}


def _gated_residual_case(shape):
    b, _, d = shape
    inputs = {"x": _randn(*shape, seed=6), "gate": _randn(b, d, seed=7), "y": _randn(*shape, seed=8)}
    return lk.gated_residual, lk.gated_residual_reference, inputs, ["x", "gate", "y"], {}


def _qk_norm_rope_case(shape, rope=True):
    _, s, _, d = shape
    cos, sin = _rope_tables(s, d) if rope else (None, None)
    inputs = {"x": _randn(*shape, seed=9) * 2, "weight": 1 + 0.3 * _randn(d, seed=10), "cos": cos, "sin": sin}
    return lk.qk_norm_rope, lk.qk_norm_rope_reference, inputs, ["x", "weight"], {"fp32_inputs": ["cos", "sin"]}


def _gelu_tanh_case(shape):
    return lk.gelu_tanh, lk.gelu_tanh_reference, {"h": _randn(*shape, seed=11) * 3}, ["h"], {}


CASE_BUILDERS = {
    "modulated_layernorm": _modulated_layernorm_case,
    "ada_layernorm_continuous": _ada_layernorm_continuous_case,
    "gated_residual": _gated_residual_case,
    "qk_norm_rope": _qk_norm_rope_case,
    "qk_norm_only": lambda shape: _qk_norm_rope_case(shape, rope=False),
    "gelu_tanh": _gelu_tanh_case,
}
"""op case name -> (shape -> (op, reference, fp64 inputs, inputs needing grad, harness options))"""

ELEMENTWISE_CASES = (
    [("modulated_layernorm", shape, layout) for shape, layout in MLN_CASES]
    + [("ada_layernorm_continuous", (2, 9, 24), "rows")]
    + [("gated_residual", shape, layout) for shape, layout in MLN_CASES]
    + [(op, shape, layout) for op in ("qk_norm_rope", "qk_norm_only") for shape, layout in QK_CASES]
    + [("gelu_tanh", shape, layout) for shape, layout in GELU_CASES]
)


def check_case(op_case: str, shape: tuple, layout: str, device: str, backend_name: str, dtype: torch.dtype) -> None:
    """Run one op case through the harness (the native tests call this with backend "native")."""
    op, reference, inputs, grads, options = CASE_BUILDERS[op_case](shape)
    run_and_compare(op, reference, inputs, grad_inputs=grads, dtype=dtype, device=device, backend_name=backend_name,
                    layout=layout, **options)


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_case,shape,layout", ELEMENTWISE_CASES, ids=str)
def test_flux_op_matches_fp64_reference(device, backend_name, dtype, op_case, shape, layout):
    """Modulated LayerNorm (and AdaLayerNormContinuous), gated residual, QK norm (+ RoPE), GELU:
    output and every gradient vs fp64."""
    cuda_or_skip(device)
    check_case(op_case, shape, layout, device, backend_name, dtype)


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prefix", [False, True], ids=["ff", "single-block"])
def test_gelu_linear_matches_fp64_reference(device, backend_name, dtype, with_prefix):
    """GELU + down projection, alone (double-block FeedForward) and after a prefix (single block)."""
    cuda_or_skip(device)
    p = 6 if with_prefix else 0
    inputs = {"h": _randn(2, 9, 40, seed=12) * 2, "weight": _randn(13, p + 40, seed=13) / 7, "bias": _randn(13, seed=14)}
    if with_prefix:
        inputs["prefix"] = _randn(2, 9, p, seed=15)
    run_and_compare(
        lk.gelu_linear, lk.gelu_linear_reference, inputs, grad_inputs=list(inputs), dtype=dtype, device=device,
        backend_name=backend_name, layout="transposed",
    )


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["attention-out", "ff-gelu", "single-block"])
def test_gated_linear_matches_fp64_reference(device, backend_name, dtype, variant):
    """residual + gate * linear(cat([prefix, gelu?(x)])): Flux's to_out, FF down and proj_out closings."""
    cuda_or_skip(device)
    gelu, p = {"attention-out": (False, 0), "ff-gelu": (True, 0), "single-block": (True, 6)}[variant]
    b, s, k, n = 2, 9, 40, 13
    inputs = {"residual": _randn(b, s, n, seed=40), "gate": _randn(b, n, seed=41), "x": _randn(b, s, k, seed=42) * 2,
              "weight": _randn(n, p + k, seed=43) / 7, "bias": _randn(n, seed=44)}
    if p:
        inputs["prefix"] = _randn(b, s, p, seed=45)
    run_and_compare(
        lk.gated_linear, lk.gated_linear_reference, inputs, grad_inputs=list(inputs), dtype=dtype, device=device,
        backend_name=backend_name, layout="rows", extra={"gelu": gelu},
    )


@pytest.mark.parametrize("device,backend_name", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_qk_norm_rope_matches_fp64_reference(device, backend_name, dtype):
    """to_q/to_k projection + RMSNorm + RoPE with the projection recomputed in backward."""
    cuda_or_skip(device)
    b, s, k, heads, hd = 2, 7, 24, 3, 10
    cos, sin = _rope_tables(s, hd)
    inputs = {"x": _randn(b, s, k, seed=50), "weight": _randn(heads * hd, k, seed=51) / 4, "bias": _randn(heads * hd, seed=52),
              "norm_weight": 1 + 0.3 * _randn(hd, seed=53), "cos": cos, "sin": sin}
    run_and_compare(
        lk.linear_qk_norm_rope, lk.linear_qk_norm_rope_reference, inputs,
        grad_inputs=["x", "weight", "bias", "norm_weight"], dtype=dtype, device=device, backend_name=backend_name,
        layout="transposed", fp32_inputs=["cos", "sin"], extra={"eps": 1e-6, "head_dim": hd},
    )


# ----------------------------------------------------------------------------- fp64 gradcheck
def _gradcheck_cases():
    d = 10
    cos, sin = _rope_tables(3, d)
    return {
        "modulated_layernorm": (lambda x, s, t: lk.modulated_layernorm(x, s, t), (_randn(2, 3, 6, seed=20), _randn(2, 6, seed=21), _randn(2, 6, seed=22))),
        "gated_residual": (lk.gated_residual, (_randn(2, 3, 5, seed=23), _randn(2, 5, seed=24), _randn(2, 3, 5, seed=25))),
        "qk_norm_rope": (lambda x, w: lk.qk_norm_rope(x, w, cos, sin), (_randn(1, 3, 2, d, seed=26), _randn(d, seed=27))),
        "gelu_tanh": (lk.gelu_tanh, (_randn(3, 7, seed=28),)),
        "gelu_linear": (lambda h, w, b, pre: lk.gelu_linear(h, w, b, pre), (_randn(2, 3, 5, seed=29), _randn(4, 7, seed=30), _randn(4, seed=31), _randn(2, 3, 2, seed=32))),
        "gated_linear": (lambda r, g, x, w, b, pre: lk.gated_linear(r, g, x, w, b, pre, gelu=True),
                         (_randn(2, 3, 4, seed=33), _randn(2, 4, seed=34), _randn(2, 3, 5, seed=35), _randn(4, 7, seed=36), _randn(4, seed=37), _randn(2, 3, 2, seed=38))),
        "linear_qk_norm_rope": (lambda x, w, b, nw: lk.linear_qk_norm_rope(x, w, b, nw, cos, sin, 1e-6, d),
                                (_randn(1, 3, 4, seed=39), _randn(2 * d, 4, seed=40), _randn(2 * d, seed=41), _randn(d, seed=42))),
    }


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("op", list(_gradcheck_cases()))
def test_fp64_gradcheck(op, backend_name):
    fn, args = _gradcheck_cases()[op]
    args = tuple(a.clone().requires_grad_(True) for a in args)
    with backend.force_backend(backend_name):
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)


# ----------------------------------------------------------------------------- what is saved
def test_gelu_linear_saves_the_pre_activation_not_the_activation():
    """The fused Function keeps h and the weight for backward, never gelu(h) nor the cat."""
    h = torch.randn(2, 9, 40, requires_grad=True)
    w = torch.randn(13, 46, requires_grad=True)
    prefix = torch.randn(2, 9, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lk.gelu_linear(h, w, None, prefix)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(2, 9, 40), (13, 46), (2, 9, 6)])


def test_gated_linear_saves_neither_activation_nor_projection():
    r, x, pre = torch.randn(2, 9, 13, requires_grad=True), torch.randn(2, 9, 40, requires_grad=True), torch.randn(2, 9, 6)
    g, w = torch.randn(2, 13, requires_grad=True), torch.randn(13, 46, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lk.gated_linear(r, g, x, w, None, pre, gelu=True)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(2, 9, 40), (2, 9, 6), (2, 13), (13, 46)])


def test_modulated_layernorm_saves_only_x_and_scale():
    x = torch.randn(2, 5, 8, requires_grad=True)
    scale, shift = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lk.modulated_layernorm(x, scale, shift)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), scale.data_ptr()]


# ----------------------------------------------------------------------------- bad input
def test_flux_ops_bad_input_names_the_argument():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\)"):
        lk.modulated_layernorm(x, torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(TypeError, match="shift has dtype"):
        lk.modulated_layernorm(x, torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        lk.gated_residual(x[0], torch.randn(2, 8), x)
    with pytest.raises(ValueError, match="y must have shape"):
        lk.gated_residual(x, torch.randn(2, 8), x[:, :4])
    with pytest.raises(ValueError, match="cos must have shape"):
        lk.qk_norm_rope(torch.randn(1, 5, 2, 8), torch.ones(8), torch.ones(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="head dim must be even"):
        lk.qk_norm_rope(torch.randn(1, 5, 2, 7), torch.ones(7), None, None)
    with pytest.raises(ValueError, match="weight must have 46 input features"):
        lk.gelu_linear(torch.randn(2, 40), torch.randn(13, 40), None, torch.randn(2, 6))
    with pytest.raises(ValueError, match="emb must have shape"):
        lk.ada_layernorm_continuous(x, torch.randn(2, 8))


# ----------------------------------------------------------------------------- wider than one column chunk
@pytest.mark.parametrize("device,width", [
    ("cpu", 77),  # the interpreter, with the column chunk capped at 32: chunks of 32, 32 and 13
    pytest.param("cuda", 3 * 1024 + 17, marks=[pytest.mark.cuda, pytest.mark.skipif(
        backend.interpreter_enabled(), reason="compiled Triton needs TRITON_INTERPRET unset")]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_case", ["modulated_layernorm", "ada_layernorm_continuous", "gated_residual"])
def test_row_kernels_walk_rows_wider_than_one_column_chunk(monkeypatch, device, width, dtype, op_case):
    """Rows wider than MAX_BLOCK_D (FLUX.2 and other DiTs): the statistics merge chunk by chunk,
    the modulation reductions accumulate per chunk; odd widths leave a partial last chunk."""
    cuda_or_skip(device)
    if device == "cpu":
        monkeypatch.setattr(_common, "MAX_BLOCK_D", 32)
    _, block_d, _, _ = _common.row_launch(2, 5, width, torch.device(device))
    assert block_d < width
    check_case(op_case, (2, 5, width), "rows", device, "triton", dtype)


def test_chunked_layernorm_gradcheck_fp64(monkeypatch):
    """The chunk-merged statistics are exact in fp64 (analytic gradient = finite differences)."""
    monkeypatch.setattr(_common, "MAX_BLOCK_D", 8)
    args = tuple(a.clone().requires_grad_(True) for a in (_randn(2, 3, 21, seed=60), _randn(2, 21, seed=61), _randn(2, 21, seed=62)))
    with backend.force_backend("triton"):
        assert torch.autograd.gradcheck(lambda x, s, t: lk.modulated_layernorm(x, s, t), args, fast_mode=True)

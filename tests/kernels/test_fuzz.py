"""Property-based fuzz of ops 1–3 over shapes, dtypes and memory layouts (Triton backend; the
interpreter on CPU). 210 cases per run in total, derandomized so CI is reproducible, no shrinking
(a failure prints its example; shrinking through the interpreter takes minutes); sizes stay tiny
so each launch is a handful of program instances. Normalised widths start at 8: below that the
norms' gradients are dominated by cancellation (width 2: LayerNorm's output is constant +-1) and
any relative-error rule is noise."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import leapkernels as lk  # noqa: E402

from .op_harness import run_and_compare  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["contiguous", "rows", "transposed"])
BATCH = st.integers(1, 3)


def _fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])


def _randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _run(op, ref, inputs, grads, dtype, layout, **kw):
    run_and_compare(op, ref, inputs, grad_inputs=grads, dtype=dtype, device="cpu", backend_name="triton",
                    layout=layout, **kw)


@_fuzz(40)
@given(b=BATCH, s=st.integers(1, 9), d=st.integers(1, 70), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999),
       per_sample=st.booleans())
def test_fuzz_leap_connector(b, s, d, dtype, layout, seed, per_sample):
    shape = (b, s, d)
    c = _randn((b,), seed + 3) if per_sample else 0.4
    inputs = {"x_from": _randn(shape, seed), "v": _randn(shape, seed + 1), "c": c, "x_true": _randn(shape, seed + 2)}
    _run(lk.leap_connector, lk.leap_connector_reference, inputs, ["x_from", "v"] + (["c"] if per_sample else []), dtype, layout)


@_fuzz(40)
@given(b=BATCH, s=st.integers(1, 9), d=st.integers(1, 70), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999),
       max_norm=st.one_of(st.none(), st.floats(0.05, 10.0)))
def test_fuzz_grad_scale(b, s, d, dtype, layout, seed, max_norm):
    inputs = {"x": _randn((b, s, d), seed), "alpha": _randn((b,), seed + 1)}
    _run(lk.grad_scale, lk.grad_scale_reference, inputs, ["x"], dtype, layout, extra={"max_norm": max_norm})


@_fuzz(30)
@given(b=BATCH, s=st.integers(1, 12), d=st.integers(8, 80), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999),
       continuous=st.booleans())
def test_fuzz_modulated_layernorm(b, s, d, dtype, layout, seed, continuous):
    x = _randn((b, s, d), seed, 2.0) + 0.3
    if continuous:
        _run(lk.ada_layernorm_continuous, lk.ada_layernorm_continuous_reference, {"x": x, "emb": _randn((b, 2 * d), seed + 1)},
             ["x", "emb"], dtype, layout)
    else:
        inputs = {"x": x, "scale": _randn((b, d), seed + 1), "shift": _randn((b, d), seed + 2)}
        _run(lk.modulated_layernorm, lk.modulated_layernorm_reference, inputs, ["x", "scale", "shift"], dtype, layout)


@_fuzz(25)
@given(b=BATCH, s=st.integers(1, 12), d=st.integers(1, 80), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999))
def test_fuzz_gated_residual(b, s, d, dtype, layout, seed):
    inputs = {"x": _randn((b, s, d), seed), "gate": _randn((b, d), seed + 1), "y": _randn((b, s, d), seed + 2)}
    _run(lk.gated_residual, lk.gated_residual_reference, inputs, ["x", "gate", "y"], dtype, layout)


@_fuzz(25)
@given(b=BATCH, s=st.integers(1, 8), h=st.integers(1, 3), half=st.integers(4, 20), dtype=DTYPES, layout=LAYOUTS,
       seed=st.integers(0, 999), rope=st.booleans())
def test_fuzz_qk_norm_rope(b, s, h, half, dtype, layout, seed, rope):
    d = 2 * half
    angles = _randn((s, half), seed + 3, 3.0).repeat_interleave(2, dim=1)
    cos, sin = (angles.cos(), angles.sin()) if rope else (None, None)
    inputs = {"x": _randn((b, s, h, d), seed, 2.0), "weight": 1 + 0.3 * _randn((d,), seed + 1), "cos": cos, "sin": sin}
    _run(lk.qk_norm_rope, lk.qk_norm_rope_reference, inputs, ["x", "weight"], dtype, layout, fp32_inputs=["cos", "sin"])


@_fuzz(25)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dtype=DTYPES, layout=st.sampled_from(["contiguous", "rows"]),
       seed=st.integers(0, 999), scale=st.floats(0.1, 8.0))
def test_fuzz_gelu_tanh(shape, dtype, layout, seed, scale):
    _run(lk.gelu_tanh, lk.gelu_tanh_reference, {"h": _randn(tuple(shape), seed, scale)}, ["h"], dtype, layout)


@_fuzz(25)
@given(b=BATCH, s=st.integers(1, 8), k=st.integers(1, 24), n=st.integers(1, 16), p=st.integers(0, 5), gelu=st.booleans(),
       dtype=DTYPES, seed=st.integers(0, 999))
def test_fuzz_gated_linear(b, s, k, n, p, gelu, dtype, seed):
    inputs = {"residual": _randn((b, s, n), seed), "gate": _randn((b, n), seed + 1), "x": _randn((b, s, k), seed + 2, 2.0),
              "weight": _randn((n, p + k), seed + 3, 0.3), "bias": _randn((n,), seed + 4)}
    if p:
        inputs["prefix"] = _randn((b, s, p), seed + 5)
    _run(lk.gated_linear, lk.gated_linear_reference, inputs, list(inputs), dtype, "rows", extra={"gelu": gelu})

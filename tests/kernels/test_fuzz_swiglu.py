"""Property-based fuzz of the SwiGLU ops over shapes, dtypes and memory layouts (Triton backend; the
interpreter on CPU), derandomized like ``test_fuzz``: 60 cases, tiny sizes (a handful of programs)."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import leapkernels as lk  # noqa: E402

from .test_fuzz import BATCH, DTYPES, LAYOUTS, _fuzz, _randn  # noqa: E402
from .op_harness import run_and_compare  # noqa: E402


def _run(op, ref, inputs, grads, dtype, layout, backend_name="triton"):
    run_and_compare(op, ref, inputs, grad_inputs=grads, dtype=dtype, device="cpu", backend_name=backend_name,
                    layout=layout)


def fuzz_swiglu(backend_name: str = "triton"):
    """The property, for any backend (the native tests run it with ``native``)."""

    @_fuzz(25)
    @given(b=BATCH, s=st.integers(1, 9), k=st.integers(1, 45), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999),
           scale=st.floats(0.1, 8.0))
    def run(b, s, k, dtype, layout, seed, scale):
        _run(lk.swiglu, lk.swiglu_reference, {"h": _randn((b, s, 2 * k), seed, scale)}, ["h"], dtype, layout, backend_name)

    run()


def fuzz_gated_swiglu_linear(backend_name: str = "triton"):
    @_fuzz(20)
    @given(b=BATCH, s=st.integers(1, 8), k=st.integers(1, 20), n=st.integers(1, 16), p=st.integers(0, 5),
           dtype=DTYPES, seed=st.integers(0, 999))
    def run(b, s, k, n, p, dtype, seed):
        inputs = {"residual": _randn((b, s, n), seed), "gate": _randn((b, n), seed + 1),
                  "h": _randn((b, s, 2 * k), seed + 2, 2.0), "weight": _randn((n, p + k), seed + 3, 0.3),
                  "bias": _randn((n,), seed + 4)}
        if p:
            inputs["prefix"] = _randn((b, s, p), seed + 5)
        _run(lk.gated_swiglu_linear, lk.gated_swiglu_linear_reference, inputs, list(inputs), dtype, "rows", backend_name)

    run()


def fuzz_swiglu_linear(backend_name: str = "triton"):
    @_fuzz(15)
    @given(b=BATCH, s=st.integers(1, 8), k=st.integers(1, 20), n=st.integers(1, 16), p=st.integers(0, 5),
           dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 999))
    def run(b, s, k, n, p, dtype, layout, seed):
        inputs = {"h": _randn((b, s, 2 * k), seed, 2.0), "weight": _randn((n, p + k), seed + 1, 0.3),
                  "bias": _randn((n,), seed + 2)}
        if p:
            inputs["prefix"] = _randn((b, s, p), seed + 3)
        _run(lk.swiglu_linear, lk.swiglu_linear_reference, inputs, list(inputs), dtype, layout, backend_name)

    run()


def fuzz_gated_mlp(backend_name: str = "triton"):
    from leapkernels.ops.gated_mlp import gated_mlp, gated_mlp_reference

    @_fuzz(20)
    @given(b=BATCH, s=st.integers(1, 6), k=st.integers(1, 12), hidden=st.integers(1, 12), n=st.integers(1, 10),
           p=st.integers(0, 4), act=st.sampled_from(["swiglu", "gelu"]), bias=st.booleans(), dtype=DTYPES,
           seed=st.integers(0, 999))
    def run(b, s, k, hidden, n, p, act, bias, dtype, seed):
        width = hidden if act == "gelu" else 2 * hidden
        inputs = {"residual": _randn((b, s, n), seed), "gate": _randn((b, n), seed + 1), "x": _randn((b, s, k), seed + 2),
                  "w_in": _randn((width, k), seed + 3, 0.5), "b_in": _randn((width,), seed + 4) if bias else None,
                  "w_out": _randn((n, p + hidden), seed + 5, 0.3), "b_out": _randn((n,), seed + 6) if bias else None}
        if p:
            inputs["prefix"] = _randn((b, s, p), seed + 7)
        grads = [name for name, v in inputs.items() if v is not None]
        run_and_compare(gated_mlp, gated_mlp_reference, inputs, grad_inputs=grads, dtype=dtype, device="cpu",
                        backend_name=backend_name, layout="rows", extra={"act": act})

    run()


FUZZ = {"swiglu": fuzz_swiglu, "swiglu_linear": fuzz_swiglu_linear, "gated_swiglu_linear": fuzz_gated_swiglu_linear,
        "gated_mlp": fuzz_gated_mlp}


@pytest.mark.parametrize("name", list(FUZZ))
def test_fuzz_swiglu_ops(name):
    FUZZ[name]()

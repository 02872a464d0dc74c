"""The property-based fuzz of ops 1–3 (``test_fuzz``: shapes, dtypes, layouts; 210 derandomized
cases) run against the native C++ backend: the same strategies and comparisons, with the
harness call pointed at ``native`` instead of the Triton interpreter."""
from __future__ import annotations

import pytest

from leapkernels import native

from . import test_fuzz as fuzz
from .op_harness import native_only, run_and_compare

pytestmark = native_only()

FUZZ_TESTS = [name for name in dir(fuzz) if name.startswith("test_fuzz_")]



CALLS: list[str] = []


def _run_native(op, ref, inputs, grads, dtype, layout, **kw):
    CALLS.append(op.__name__)
    run_and_compare(op, ref, inputs, grad_inputs=grads, dtype=dtype, device="cpu", backend_name="native",
                    layout=layout, **kw)


def test_every_fuzz_property_is_covered():
    assert len(FUZZ_TESTS) >= 6, FUZZ_TESTS


@pytest.mark.parametrize("name", FUZZ_TESTS)
def test_native_fuzz(name, monkeypatch):
    monkeypatch.setattr(fuzz, "_run", _run_native)
    before = len(CALLS)
    getattr(fuzz, name)()
    assert len(CALLS) - before >= 20, "the fuzz did not reach the native harness call"

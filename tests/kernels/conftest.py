"""Fixtures of the kernel tests (the Triton interpreter itself is switched on by tests/conftest.py)."""
from __future__ import annotations

import pytest

from leapkernels import backend, native


@pytest.fixture
def native_registered():
    """Native is in the registry for the test; afterwards the registry is as it was before.

    ``import leapkernels`` registers native already, and other modules choose their backends when
    they are collected: unregistering unconditionally made every later native case of
    test_expanded_grad fail (in that order: test_native_flux_ops, then test_expanded_grad).
    """
    before = {op for op in native.KERNELS if native.NAME in backend.registered(op)}
    native.register_all()
    yield
    native.unregister_all()
    if before:
        native.register_all()

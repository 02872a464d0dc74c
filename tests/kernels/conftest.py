"""Fixtures of the kernel tests (the Triton interpreter itself is switched on by tests/conftest.py)."""
from __future__ import annotations

import pytest

from leapkernels import native


@pytest.fixture
def native_registered():
    """Native joins the registry for the test only (other tests see the registry they expect)."""
    native.register_all()
    yield
    native.unregister_all()

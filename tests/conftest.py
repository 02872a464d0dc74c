"""Test setup: the Triton interpreter must be on before any kernel module is imported (DESIGN §4)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under `pytest -n 2` on a 2-core machine, two workers with two torch threads each oversubscribe the
# cores and waste most of their CPU on tiny tensors: one thread per worker is several times faster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: tiny models measured against each other (the planner's
    proofs) are faster and steadier that way on a shared 2-core machine, with or without xdist."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

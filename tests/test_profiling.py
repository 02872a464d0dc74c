"""Saved-for-backward byte counting and peak memory, on ops whose saved tensors are known exactly."""
from __future__ import annotations

import pytest
import torch

from leapalign.profiling import PeakMemory, SavedTensorCounter, saved_tensor_bytes


def test_counts_exactly_what_an_op_saves():
    x = torch.randn(1000, requires_grad=True)
    nbytes, y = saved_tensor_bytes(torch.exp, x)  # exp saves its result: 1000 float32
    assert nbytes == 4000
    nbytes, y = saved_tensor_bytes(lambda t: t.sin(), x.double())  # sin saves its input: 1000 float64
    assert nbytes == 8000


def test_unique_storages_counted_once():
    x = torch.randn(256, requires_grad=True)
    with SavedTensorCounter() as counter:
        y = x.sin() + x.cos()  # both save x
        z = x[:128].sin()  # a view of x: same storage
    assert counter.count == 3
    assert counter.bytes == 256 * 4
    del y, z


def test_parameters_and_their_views_are_excluded():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensorCounter() as counter:
        out = lin(x)  # saves x and the weight (a Parameter)
        out2 = x @ lin.weight.t()  # saves a view of the weight
    assert counter.bytes == 8 * 64 * 4, counter.bytes
    assert counter.by_dtype == {"float32": 8 * 64 * 4}
    del out, out2


def test_no_grad_saves_nothing_and_exclude_works():
    x = torch.randn(100, requires_grad=True)
    with torch.no_grad():
        nbytes, _ = saved_tensor_bytes(torch.exp, x)
    assert nbytes == 0
    with SavedTensorCounter(exclude=[x]) as counter:
        y = x.sin()
    assert counter.bytes == 0 and counter.count == 1
    del y


def test_peak_memory_cpu_sees_a_large_allocation():
    with PeakMemory("cpu") as pm:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB touched
        del block
    report = pm.report
    assert report.peak_rss is not None and report.peak_rss > 0
    if report.peak_rss_reset:  # the kernel let us reset the high-water mark: the delta is this block's
        assert report.peak_delta >= 48 * 1024 * 1024, report


@pytest.mark.cuda
def test_peak_memory_cuda_allocator():
    with PeakMemory("cuda") as pm:
        block = torch.empty(32 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        del block
    assert pm.report.peak_delta >= 32 * 1024 * 1024


def test_checkpoint_inputs_are_counted_instead_of_activations():
    """Non-reentrant checkpoint: its activations are not kept (not counted), its input is (counted)."""
    x = torch.randn(1000, requires_grad=True)
    plain, _ = saved_tensor_bytes(lambda t: t.sin().exp(), x)  # sin saves x, exp saves its result
    assert plain == 8000
    with SavedTensorCounter() as counter:
        y = torch.utils.checkpoint.checkpoint(lambda t: t.sin().exp(), x * 2, use_reentrant=False)
    assert counter.bytes == 4000  # the checkpoint's input x * 2 only
    y.sum().backward()
    assert torch.allclose(x.grad, 2 * torch.cos(2 * x) * torch.exp(torch.sin(2 * x)))


def test_saved_bytes_count_fake_storages_once_each():
    """Under FakeTensorMode every storage has data pointer 0: distinct storages must still count apart and
    views of one storage once, so a fake run counts exactly what the same real run counts (``leapalign plan``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leapalign.profiling import SavedTensorCounter

    def saved(make) -> int:
        a, b = make(64), make(32)
        with SavedTensorCounter() as counter:
            (a * b.repeat(2)).sum().add((a.view(8, 8) * a.view(8, 8).t()).sum())
        return counter.bytes

    real = saved(lambda n: torch.randn(n, requires_grad=True))
    with FakeTensorMode():
        fake = saved(lambda n: torch.randn(n, requires_grad=True))
    assert real > 64 * 4 and fake == real, (fake, real)

"""pytest-benchmark: each fused op vs eager PyTorch vs ``torch.compile``, forward + backward.

    pytest benchmarks/ --benchmark-only [--benchmark-json PATH] [--benchmark-compare]

On the current device: CUDA runs the compiled Triton kernels at FLUX.1-dev shapes (bf16); CPU
runs the native C++ backend where it was built (else the PyTorch reference backend) at the
``cpu`` shape (fp32) — never the Triton interpreter, a correctness tool. The ops, shapes and
inputs are `benchmarks.kernels.op_cases`; each benchmark is grouped by op, so the report puts
``fused``, ``eager`` and ``compile`` side by side. ``extra_info`` carries the backend, shape,
minimum bytes moved and, on a known GPU, the roofline floor (bytes / memory bandwidth) and the
achieved time over it. Not part of ``make test`` (which runs ``pytest tests``).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=1: compiled Triton kernels cannot be timed", allow_module_level=True)

from benchmarks.kernels import SHAPES, _make_step, _REGISTRY_NAME, _traffic_bytes, op_cases, peak_bandwidth  # noqa: E402
from leapkernels import backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = "flux-dev" if DEVICE.type == "cuda" else "cpu"
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
OPS = [case.name for case in op_cases(SHAPES["tiny"], torch.float32, torch.device("cpu"))]


def _fused_backend(op: str) -> str:
    """What ``fused`` runs here: triton on CUDA; native on CPU where built, else the reference."""
    if DEVICE.type == "cuda":
        return "triton"
    return "native" if "native" in backend.registered(_REGISTRY_NAME.get(op, op)) else "reference"


def _synchronised(step):
    if DEVICE.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, impl):
    case = next(c for c in op_cases(SHAPES[SHAPE], DTYPE, DEVICE) if c.name == op)
    inputs = case.make_inputs()
    with torch.no_grad():
        probe = case.reference(*[x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, probe.dtype)
    fn = {"fused": case.fused, "eager": case.reference}.get(impl) or torch.compile(case.reference, dynamic=False)
    forced = _fused_backend(op) if impl == "fused" else None
    _, total_bytes = _traffic_bytes(inputs, probe)
    benchmark.group = op
    benchmark.extra_info.update(device=str(DEVICE), shape=SHAPE, dtype=str(DTYPE).removeprefix("torch."),
                                backend=forced or "pytorch", bytes_moved=total_bytes,
                                torch_threads=torch.get_num_threads(), load_average=os.getloadavg())
    step = _synchronised(_make_step(fn, inputs, upstream))
    with backend.force_backend(forced):
        step()  # warm-up: allocations, compilation
        benchmark(step)
    bandwidth = peak_bandwidth(DEVICE) if case.memory_bound else None
    if bandwidth and benchmark.stats is not None:
        floor = total_bytes / bandwidth
        benchmark.extra_info.update(floor_seconds=floor, x_floor=benchmark.stats.stats.median / floor)

"""How every kernel test judges an op: the tolerances (written once here) and the comparison run.

Rule (DESIGN §4, flash-attention's for low precision): each output and gradient is compared to a
float64 run of the plain-PyTorch reference on the same (already rounded) input values, by
``max|out - truth| / max|truth|``.
    fp32:       error <= max(2 x the fp32 reference's own error, 1e-6) and always < 5e-6.
    bf16/fp16:  error <= 2 x the error of the reference run in that dtype, plus a floor of 1 ulp.
    fp64:       error <= 1e-12.
NaN/inf never pass. The op runs with every kernel-allocated buffer poisoned with NaN.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

from leapkernels import backend

# low precision: one ulp at the largest magnitude (an op may round its output once more than a
# baseline that got lucky on a handful of elements); far below DESIGN's bf16 bar of 1e-2
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
FP32_CEILING = 5e-6
LOW_PRECISION = (torch.bfloat16, torch.float16)


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """``max|out - truth| / max|truth|`` in fp64 (``inf`` if ``out`` has a NaN/inf)."""
    out64, truth64 = out.detach().to(torch.float64).cpu(), truth.detach().to(torch.float64).cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    scale = truth64.abs().max().item()
    return (out64 - truth64).abs().max().item() / max(scale, 1e-30)


def bound(dtype: torch.dtype, baseline_err: float) -> float:
    """The largest error a kernel result of ``dtype`` may have, given the plain reference's."""
    if dtype == torch.float64:
        return FLOOR[dtype]
    if dtype == torch.float32:
        return min(max(2 * baseline_err, FLOOR[dtype]), FP32_CEILING)
    return 2 * baseline_err + FLOOR[dtype]


def assert_close(name: str, out: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> None:
    """Apply the rule above to one tensor (``baseline``: the reference's own low-precision result)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    err, base = rel_err(out, truth), rel_err(baseline, truth)
    limit = bound(dtype, base)
    assert err <= limit, f"{name} ({dtype}): error {err:.3e} > bound {limit:.3e} (plain PyTorch's error {base:.3e})"


def backends_under_test() -> list:
    """``triton`` (interpreter on CPU) and ``reference`` on CPU; ``triton`` compiled on CUDA."""
    cuda_reason = "compiled Triton needs a GPU and TRITON_INTERPRET unset"
    return [
        pytest.param("cpu", "triton", id="cpu-triton"),
        pytest.param("cpu", "reference", id="cpu-reference"),
        pytest.param(
            "cuda", "triton", id="cuda-triton",
            marks=[pytest.mark.cuda, pytest.mark.skipif(backend.interpreter_enabled(), reason=cuda_reason)],
        ),
    ]


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout: ``contiguous``, ``rows`` (every other sample of a
    bigger buffer: strided batch), or ``transposed`` (last two dims stored swapped)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "rows":
        big = torch.empty((t.shape[0] * 2,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    if layout == "transposed":
        assert t.dim() >= 3
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def run_and_compare(
    op: Callable[..., object],
    reference: Callable[..., object],
    inputs: dict[str, torch.Tensor],
    *,
    grad_inputs: Sequence[str],
    dtype: torch.dtype,
    device: str,
    backend_name: str,
    layout: str = "contiguous",
    extra: dict | None = None,
    fp32_inputs: Sequence[str] = (),
    seed: int = 0,
) -> None:
    """Run ``op`` and ``reference`` on the same ``inputs`` (fp64 masters) and compare everything.

    ``inputs`` are fp64 CPU tensors; they are cast to ``dtype``/``device`` and laid out per
    ``layout`` for the op and the low-precision baseline, kept fp64 for the truth. Outputs may be
    a tensor or a tuple (``None`` entries skipped; non-differentiable ones compared only forward).
    The same random upstream gradient drives every backward. ``fp32_inputs`` (e.g. RoPE tables)
    stay fp32 whatever ``dtype`` is (fp64 for the truth).
    """
    extra = extra or {}
    gen = torch.Generator().manual_seed(seed)

    def prepared(cast: torch.dtype, on: str, lay: str) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in inputs.items():
            if not isinstance(v, torch.Tensor):
                out[k] = v
                continue
            want = torch.float32 if k in fp32_inputs and cast != torch.float64 else cast
            t = strided(v.to(device=on, dtype=want), lay if v.dim() >= 3 or lay == "rows" else "contiguous")
            if k in grad_inputs:
                t.requires_grad_(True)
            out[k] = t
        return out

    # the truth sees exactly the values the op sees (inputs rounded to ``dtype`` first), so errors
    # measure arithmetic, not input rounding; RoPE-like fp32 inputs are rounded to fp32
    inputs = {k: (v.to(torch.float32 if k in fp32_inputs else dtype).to(torch.float64) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    truth_in = prepared(torch.float64, "cpu", "contiguous")
    base_in = prepared(dtype, "cpu", "contiguous")
    op_in = prepared(dtype, device, layout)

    truth_out = _as_tuple(reference(**truth_in, **extra))
    base_out = _as_tuple(reference(**base_in, **extra))
    with backend.force_backend(backend_name), backend.poison_outputs():
        op_out = _as_tuple(op(**op_in, **extra))
        grads_up = [
            torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
            if t is not None and t.requires_grad else None
            for t in truth_out
        ]
        for i, (o, t, b) in enumerate(zip(op_out, truth_out, base_out)):
            if t is None:
                continue
            assert o.dtype == b.dtype, f"output {i}: dtype {o.dtype}, reference gives {b.dtype}"
            assert_close(f"output {i}", o, t, b, dtype)
        diff = [i for i, g in enumerate(grads_up) if g is not None]
        if not diff:
            return
        wrt = list(grad_inputs)
        g_op = torch.autograd.grad(
            [op_out[i] for i in diff], [op_in[k] for k in wrt],
            [grads_up[i].to(device=device, dtype=op_out[i].dtype) for i in diff], allow_unused=True,
        )
    g_truth = torch.autograd.grad([truth_out[i] for i in diff], [truth_in[k] for k in wrt], [grads_up[i] for i in diff], allow_unused=True)
    g_base = torch.autograd.grad(
        [base_out[i] for i in diff], [base_in[k] for k in wrt],
        [grads_up[i].to(base_out[i].dtype) for i in diff], allow_unused=True,
    )
    for k, go, gt, gb in zip(wrt, g_op, g_truth, g_base):
        assert (go is None) == (gt is None), f"grad of {k}: op gives {go is not None}, reference {gt is not None}"
        if gt is not None:
            assert go.dtype == op_in[k].dtype, f"grad of {k}: dtype {go.dtype}, input is {op_in[k].dtype}"
            assert_close(f"grad of {k}", go, gt, gb, dtype)


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def native_only() -> list:
    """``pytestmark`` of a native-backend test module: skipped without the library, and with the
    native kernels registered for each test (the ``native_registered`` fixture)."""
    from leapkernels import native

    return [
        pytest.mark.skipif(not native.available(), reason=f"native backend absent: {native.unavailable_reason()}"),
        pytest.mark.usefixtures("native_registered"),
    ]


def results_per_thread_count(fn: Callable[[], object], counts: Sequence[int] = (1, 2)) -> list:
    """``fn()`` run once under each torch thread count (the count is restored after)."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


def cuda_or_skip(device: str) -> None:
    """Skip a test parametrised on ``device`` where that device is absent."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

"""Native CPU backend: the C++ kernels in ``csrc/`` (ATen + OpenMP), registered as ``native``.

``CMakeLists.txt`` builds ``leapkernels/_native/libleapkernels_native.so`` (``setup.py`` drives
it on ``pip install``); the library registers its ops with the PyTorch dispatcher under
``torch.ops.leapkernels_native`` and this module loads it with `torch.ops.load_library`. Each op's
forward and backward *kernels* are then registered with `leapkernels.backend` under ``native``,
following the op's kernel contract (the comment block in ``leapkernels/ops/<op>.py``); the op's
own ``torch.autograd.Function`` is unchanged, so what is saved and recomputed is identical to
every other backend.

Importing this module loads the library and declares the ``native`` backend to
`leapkernels.backend` (preferred by ``auto`` on CPU, with `unavailable_reason` as its reason);
`register_all()` adds the kernels to the registry. When the library is absent this module still
imports: `status()` says why (no compiler, build failed — with the build log —, built against
another torch, load error), `register_all()` registers nothing, and asking for
``LEAPKERNELS_BACKEND=native`` fails loudly, with that reason.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from leapkernels import backend
from leapkernels.ops._common import no_forward

NAME = "native"
LIBRARY_DIR = Path(__file__).resolve().parent / "_native"
LIBRARY_PATH = LIBRARY_DIR / "libleapkernels_native.so"
BUILD_RECORD = LIBRARY_DIR / "build.json"
"""Written by ``setup.py`` on every build attempt: ``status`` (built|failed|skipped), ``reason``,
``torch_version`` (the torch it compiled against), ``log`` (path of the CMake output)."""

BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (needs a C++20 compiler, cmake, and "
    "torch importable at build time), or by hand as CMakeLists.txt explains"
)


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native library is loaded, and if not, why (``reason`` is for humans)."""

    available: bool
    reason: str
    library: Path | None = None


def _build_record() -> dict | None:
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return None


def _absent_reason() -> str:
    record = _build_record()
    if record is None:
        return f"{LIBRARY_PATH} is missing and no build was recorded; {BUILD_HINT}"
    reason = record.get("reason") or "no reason recorded"
    log = record.get("log")
    where = f" (build log: {log})" if log else ""
    return f"the native build {record.get('status', 'did not run')}: {reason}{where}; {BUILD_HINT}"


def _load() -> NativeStatus:
    if os.environ.get("LEAPKERNELS_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return NativeStatus(False, "disabled by LEAPKERNELS_NATIVE=0")
    if not LIBRARY_PATH.is_file():
        return NativeStatus(False, _absent_reason())
    record = _build_record() or {}
    built_for = record.get("torch_version")
    if built_for is not None and built_for != torch.__version__:
        return NativeStatus(
            False,
            f"{LIBRARY_PATH.name} was built against torch {built_for} but torch {torch.__version__} is "
            f"running (the C++ ABI may differ); rebuild: {BUILD_HINT}",
        )
    try:
        torch.ops.load_library(str(LIBRARY_PATH))
    except (OSError, RuntimeError) as exc:  # missing symbols, wrong architecture, ...
        return NativeStatus(False, f"loading {LIBRARY_PATH} failed: {exc}")
    return NativeStatus(True, "", LIBRARY_PATH)


_STATUS = _load()


def status() -> NativeStatus:
    """The native backend's state, decided once at import."""
    return _STATUS


def available() -> bool:
    """Whether the native kernels are loaded and registered with `leapkernels.backend`."""
    return _STATUS.available


def unavailable_reason() -> str | None:
    """Why the native backend is absent (``None`` when it is available)."""
    return None if _STATUS.available else _STATUS.reason


def _ops():
    return torch.ops.leapkernels_native


backend.declare_backend(NAME, auto_devices=("cpu",), unavailable_reason=lambda: unavailable_reason())


# ----------------------------------------------------------------------------- kernel adapters
# Each pair follows the kernel contract written in the op's module; full-size outputs come from
# backend.empty (NaN under backend.poison_outputs, so an unwritten element fails a test).


def _leap_connector_forward(x, v, c, x_true):
    out = backend.empty(x.shape, dtype=x.dtype, device=x.device)
    if x_true is None:
        _ops().leap_fwd(x, v, c, out)
        return out, None
    return out, _ops().leap_connector_fwd(x, v, c, x_true, out)


def _leap_connector_backward(g, v, c, need_dc):
    grad_v = backend.empty(g.shape, dtype=g.dtype, device=g.device)
    if need_dc:
        return grad_v, _ops().leap_bwd_dc(g, v, c, grad_v)
    _ops().leap_bwd(g, c, grad_v)
    return grad_v, None


def _grad_scale_backward(g, alpha, max_norm):
    out = backend.empty(g.shape, dtype=g.dtype, device=g.device)
    _ops().grad_scale_bwd(g, alpha, max_norm, out)
    return out


def _unused_output(like: torch.Tensor) -> torch.Tensor:
    """A placeholder for an output the kernel is told not to write."""
    return like.new_empty(0)


def _modulated_layernorm_forward(x, scale, shift, eps):
    y = backend.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops().mln_fwd(x, scale, shift, eps, y)
    return y


def _modulated_layernorm_backward(g, x, scale, eps, need_dx, need_dmod):
    dx = backend.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else _unused_output(x)
    dscale, dshift = _ops().mln_bwd(g, x, scale, eps, dx, need_dx, need_dmod)
    if not need_dmod:
        dscale = dshift = None
    return (dx if need_dx else None), dscale, dshift


def _gated_residual_forward(x, gate, y):
    out = backend.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops().gr_fwd(x, gate, y, out)
    return out


def _gated_residual_backward(g, gate, y, need_dy, need_dgate):
    dy = backend.empty(g.shape, dtype=y.dtype, device=g.device) if need_dy else _unused_output(g)
    dgate = _ops().gr_bwd(g, gate, y, dy, need_dy, need_dgate)
    return (dy if need_dy else None), (dgate if need_dgate else None)


def _rope_tables(cos, sin, dtype):
    """cos/sin in the kernel's accumulation dtype (a no-op for Flux's fp32 tables)."""
    if cos is None:
        return None, None
    acc = backend.accumulator_dtype(dtype)
    return cos.to(acc), sin.to(acc)


def _qk_norm_rope_forward(x, weight, cos, sin, eps):
    out = backend.empty(x.shape, dtype=x.dtype, device=x.device)
    cos, sin = _rope_tables(cos, sin, x.dtype)
    _ops().qk_fwd(x, weight, cos, sin, eps, out)
    return out


def _qk_norm_rope_backward(g, x, weight, cos, sin, eps, need_dx, need_dw):
    dx = backend.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else _unused_output(x)
    cos, sin = _rope_tables(cos, sin, x.dtype)
    dw = _ops().qk_bwd(g, x, weight, cos, sin, eps, dx, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None)


def _gelu_tanh_forward(h):
    out = backend.empty(h.shape, dtype=h.dtype, device=h.device)
    _ops().gelu_fwd(h, out)
    return out


def _gelu_tanh_backward(da, h):
    dh = backend.empty(h.shape, dtype=h.dtype, device=h.device)
    _ops().gelu_bwd(da, h, dh)
    return dh


def _swiglu_forward(h):
    out = backend.empty((h.shape[0], h.shape[1] // 2), dtype=h.dtype, device=h.device)
    _ops().swiglu_fwd(h, out)
    return out


def _swiglu_backward(da, h):
    dh = backend.empty(h.shape, dtype=h.dtype, device=h.device)
    _ops().swiglu_bwd(da, h, dh)
    return dh


KERNELS: dict[str, tuple[Callable, Callable]] = {
    "leap_connector": (_leap_connector_forward, _leap_connector_backward),
    "grad_scale": (no_forward("grad_scale"), _grad_scale_backward),
    "modulated_layernorm": (_modulated_layernorm_forward, _modulated_layernorm_backward),
    "gated_residual": (_gated_residual_forward, _gated_residual_backward),
    "qk_norm_rope": (_qk_norm_rope_forward, _qk_norm_rope_backward),
    "gelu_tanh": (_gelu_tanh_forward, _gelu_tanh_backward),
    "swiglu": (_swiglu_forward, _swiglu_backward),
}
"""op name (as in ``leapkernels/ops/<op>.py``'s ``OP``) -> (forward, backward) kernel adapters."""

LIBRARY_OPS: dict[str, tuple[str, ...]] = {"swiglu": ("swiglu_fwd", "swiglu_bwd")}
"""Ops added after the first native release -> the library functions they call: a library built
before them (a stale build) lacks these, and the op is then left to the other backends."""


def _in_library(op: str) -> bool:
    return all(hasattr(_ops(), name) for name in LIBRARY_OPS.get(op, ()))


def missing_ops() -> tuple[str, ...]:
    """Ops whose kernels the loaded library lacks (built from older sources; rebuild to get them)."""
    return tuple(op for op in KERNELS if _STATUS.available and not _in_library(op))


def register_all() -> tuple[str, ...]:
    """Register every native kernel pair with `leapkernels.backend`; returns the ops registered.

    Idempotent; a no-op (returns ``()``) when the library is unavailable; an op the loaded library
    lacks (`missing_ops`: built from older sources) is skipped. Importing this module
    does not register anything: the package (or a test, a benchmark) decides when native joins
    the registry.
    """
    if not _STATUS.available:
        return ()
    ops = tuple(op for op in KERNELS if _in_library(op))
    for op in ops:
        forward, backward = KERNELS[op]
        backend.register(op, NAME, backend.KernelSet(forward, backward))
    return ops


def unregister_all() -> None:
    """Remove the native kernels from the registry again (tests that need a registry without them)."""
    for op in KERNELS:
        backend.unregister(op, NAME)

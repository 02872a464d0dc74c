"""Backend choice for every fused op: one registry, one override variable, no silent fallback.

Each op registers one implementation per backend (`register`). An implementation is a
`KernelSet`: the op's forward and backward *kernels* (not autograd graphs), so the op's
`torch.autograd.Function` — what it saves, what it recomputes — is the same whichever backend
runs the arithmetic.

Backends:
    ``triton``     Triton kernels: compiled on CUDA tensors, run by the Triton interpreter on CPU
                   tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
    ``reference``  the same kernel contracts written in plain PyTorch (fp32 arithmetic); the CPU
                   default without the interpreter.
    others         declared by the module that provides them (`declare_backend`): this module
                   knows nothing of them but what they declare — the device types ``auto``
                   prefers them on and why they may be unavailable (e.g. a C++ CPU backend
                   whose library was not built).

Choice (``select_backend``): a `force_backend` context wins, then ``LEAPKERNELS_BACKEND``
(``triton``, ``reference``, a declared backend, or ``auto``; default ``auto``), then ``auto``:
CUDA -> triton, CPU -> triton under the interpreter, else a declared backend preferred on that
device where the op has its kernels, else reference. A forced backend that cannot run raises
`BackendUnavailableError`; nothing ever falls back quietly.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

ENV_VAR = "LEAPKERNELS_BACKEND"
BUILTIN_BACKENDS = ("triton", "reference")

_forced: str | None = None
_registry: dict[str, dict[str, "KernelSet"]] = {}
_declared: dict[str, "BackendInfo"] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on this device (never silently replaced)."""


@dataclass(frozen=True)
class KernelSet:
    """One backend's kernels for one op: ``forward(*args)`` and ``backward(*args)``.

    The argument contract is the op's own (documented in its module); every backend of an op
    must honour the same one.
    """

    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class BackendInfo:
    """What a backend other than the built-in two declares about itself.

    ``auto_devices``: device types on which ``auto`` prefers it (for ops that have its kernels).
    ``unavailable_reason``: called when a forced backend lacks an op's kernels; a sentence saying
    why (library not built, ...), or ``None`` when it is available.
    """

    name: str
    auto_devices: tuple[str, ...] = ()
    unavailable_reason: Callable[[], str | None] = lambda: None


def declare_backend(
    name: str, *, auto_devices: tuple[str, ...] = (), unavailable_reason: Callable[[], str | None] | None = None
) -> None:
    """Make ``name`` a backend ops may register kernels for and users may ask for (idempotent)."""
    if name in BUILTIN_BACKENDS or name == "auto":
        raise ValueError(f"{name!r} is a built-in backend name; choose another")
    _declared[name] = BackendInfo(name, tuple(auto_devices), unavailable_reason or (lambda: None))


def backends() -> tuple[str, ...]:
    """Every backend name: the built-in ones, then the declared ones."""
    return BUILTIN_BACKENDS + tuple(_declared)


def _choices() -> tuple[str, ...]:
    return backends() + ("auto",)


def register(op: str, backend: str, kernels: KernelSet) -> None:
    """Register ``kernels`` as ``backend``'s implementation of ``op`` (later calls replace)."""
    if backend not in backends():
        raise ValueError(f"backend must be one of {backends()} (declare others with declare_backend), got {backend!r}")
    _registry.setdefault(op, {})[backend] = kernels


def unregister(op: str, backend: str) -> None:
    """Remove ``backend``'s kernels for ``op`` (no-op if absent)."""
    _registry.get(op, {}).pop(backend, None)


def registered(op: str) -> tuple[str, ...]:
    """Backends that have an implementation of ``op``."""
    return tuple(_registry.get(op, {}))


def triton_available() -> bool:
    """Whether the ``triton`` package imports (it is absent on some CPU-only platforms)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether triton kernels run in the interpreter (decided when triton was imported)."""
    if not triton_available():
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def requested_backend() -> str:
    """The backend asked for: `force_backend` context, else ``LEAPKERNELS_BACKEND``, else auto."""
    if _forced is not None:
        return _forced
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _choices():
        raise ValueError(f"{ENV_VAR} must be one of {_choices()}, got {value!r}")
    return value


def select_backend(device: torch.device, op: str | None = None) -> str:
    """The backend that will run ``op`` on ``device``; raises if a forced one cannot run there.

    ``auto`` prefers a declared backend whose ``auto_devices`` hold the device type, for an op
    (``op`` given) that has its kernels.
    """
    wanted = requested_backend()
    if wanted == "auto":
        return _auto_backend(device, op)
    if wanted == "triton":
        if not triton_available():
            raise BackendUnavailableError(f"{ENV_VAR}=triton but `import triton` fails")
        if device.type == "cpu" and not interpreter_enabled():
            raise BackendUnavailableError(
                f"{ENV_VAR}=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"Triton kernels cannot run on device {device}")
    return wanted


def _auto_backend(device: torch.device, op: str | None) -> str:
    if device.type == "cuda":
        if not triton_available():
            raise BackendUnavailableError(
                "CUDA tensors run Triton kernels but `import triton` fails; install triton or set "
                f"{ENV_VAR}=reference to run the PyTorch reference on purpose"
            )
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton"
    impls = _registry.get(op, {}) if op is not None else {}
    for info in _declared.values():
        if device.type in info.auto_devices and info.name in impls:
            return info.name
    return "reference"


def kernels_for(op: str, device: torch.device) -> KernelSet:
    """The registered kernels of ``op`` for the backend chosen on ``device``."""
    backend = select_backend(device, op)
    impls = _registry.get(op)
    if impls is None:
        raise KeyError(f"no op named {op!r} is registered; known: {sorted(_registry)}")
    if backend not in impls:
        info = _declared.get(backend)
        reason = info.unavailable_reason() if info is not None else None
        why = f" ({backend}: {reason})" if reason else ""
        raise BackendUnavailableError(
            f"op {op!r} has no {backend!r} backend (registered: {sorted(impls)}){why}; "
            f"choose another with {ENV_VAR}"
        )
    return impls[backend]


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run the block with ``name`` as the requested backend (``None``: back to the env var)."""
    global _forced
    if name is not None and name not in _choices():
        raise ValueError(f"backend must be one of {_choices()} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


@dataclass(frozen=True)
class GpuTarget:
    """What the launch heuristics read off a GPU (`gpu_target`): its size and per-SM limits."""

    name: str
    multi_processor_count: int
    max_threads_per_multi_processor: int = 2048
    regs_per_multiprocessor: int = 65536
    capability: tuple[int, int] = (9, 0)


H100 = GpuTarget("NVIDIA H100 SXM (132 SMs)", 132)
"""The default ahead-of-time compilation target (`compile_for`)."""

REGISTER_BUDGET = 128
"""Registers per thread the launch heuristics assume a kernel uses at most (the AOT tests assert
it at Flux widths): with it, `program_budget` counts the programs one wave keeps resident."""

_compile_target: GpuTarget | None = None


@contextlib.contextmanager
def compile_for(target: GpuTarget = H100) -> Iterator[None]:
    """Launchers given *meta* tensors choose blocks, warps and program counts as on ``target``
    (ahead-of-time compilation without a GPU: `leapkernels.aot`)."""
    global _compile_target
    previous, _compile_target = _compile_target, target
    try:
        yield
    finally:
        _compile_target = previous


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    return GpuTarget(
        props.name, props.multi_processor_count,
        getattr(props, "max_threads_per_multi_processor", 2048), getattr(props, "regs_per_multiprocessor", 65536),
        (props.major, props.minor),
    )


def gpu_target(device: torch.device) -> GpuTarget | None:
    """The GPU a launch on ``device`` is sized for: the CUDA device itself, the `compile_for` target
    for meta tensors, else ``None`` (CPU: the interpreter)."""
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":
        return _compile_target
    return None


def program_budget(device: torch.device, num_warps: int = 4) -> int:
    """How many programs a looping kernel of ``num_warps`` warps should launch on ``device``.

    On a GPU: one full wave — every SM filled with as many programs as its thread and register
    limits keep resident (at `REGISTER_BUDGET` registers per thread); the kernels loop over the
    rest. The interpreter costs ~1 ms per program, so on CPU few large programs win.
    """
    gpu = gpu_target(device)
    if gpu is None:
        return 8
    threads = 32 * num_warps
    resident = min(gpu.max_threads_per_multi_processor // threads, gpu.regs_per_multiprocessor // (threads * REGISTER_BUDGET))
    return gpu.multi_processor_count * max(1, resident)


def tile_elements(device: torch.device) -> int:
    """Elements one program holds in a tile: registers bound it on a GPU, numpy vectors on CPU."""
    return 4096 if gpu_target(device) is not None else 16384


_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every buffer the launchers allocate with NaN (tests: an unwritten element must fail)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill entirely (NaN-filled under `poison_outputs`)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a kernel given its input dtype: fp64 stays fp64 (gradcheck), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_warps(tile: int) -> int:
    """Warps for a program holding ``tile`` elements (GPU; the interpreter ignores it): one warp
    per 256 elements, at most 8 — 8 values of each operand per thread at 2,048 (one 16-byte
    vector of bf16), 16 at 4,096."""
    return max(1, min(8, tile // 256))

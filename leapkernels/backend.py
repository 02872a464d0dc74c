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


def program_budget(device: torch.device) -> int:
    """How many programs a row-looping kernel should launch on ``device``.

    The interpreter costs ~1 ms per program, so on CPU few large programs win; on CUDA enough
    programs to fill every SM a few times.
    """
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def tile_elements(device: torch.device) -> int:
    """Elements one program holds in a tile: registers bound it on CUDA, numpy vectors on CPU."""
    return 4096 if device.type == "cuda" else 16384


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
    """Warps for a program holding ``tile`` elements (CUDA; the interpreter ignores it):
    ~8 fp32 values per thread up to 8 warps, so wide Flux rows (3072) do not spill registers."""
    return max(1, min(8, tile // 256))

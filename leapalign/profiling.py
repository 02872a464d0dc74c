"""Memory is measured, not guessed (DESIGN §4).

- :class:`SavedTensorCounter` / :func:`saved_tensor_bytes`: bytes autograd saves for backward,
  counted through ``torch.autograd.graph.saved_tensors_hooks``. Exact and device-independent (works
  on CPU), unique storages counted once, parameters (and views of them) excluded, since they are
  resident anyway. Inside a non-reentrant ``torch.utils.checkpoint`` region the activations are
  dropped (checkpoint's own hooks) and not counted; the inputs the checkpoint keeps are saved
  through autograd and are counted, which is what the checkpoint really holds.
- :class:`PeakMemory`: peak memory over a region. CUDA: ``torch.cuda.max_memory_allocated`` after a
  reset, and device-wide used memory from NVML when ``nvidia-ml-py`` is importable. CPU: the process
  high-water RSS from ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs``
  where the kernel allows; otherwise the lifetime peak from ``resource.getrusage``).
"""
from __future__ import annotations

import resource
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["SavedTensorCounter", "saved_tensor_bytes", "PeakMemory", "MemoryReport"]


def _is_parameter(t: torch.Tensor) -> bool:
    if isinstance(t, torch.nn.Parameter):
        return True
    base = getattr(t, "_base", None)
    return isinstance(base, torch.nn.Parameter)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    """One key per live storage. Fake tensors (``leapalign plan``) all have data pointer 0, so they are
    keyed by their storage object's address instead, unique while the storage lives (as the graph keeps it)."""
    storage = t.untyped_storage()
    if isinstance(t, FakeTensor):
        return ("fake:" + str(t.device), storage._cdata)
    return (str(t.device), storage.data_ptr())


class SavedTensorCounter:
    """Context manager counting what autograd saves for backward inside it.

    Attributes after (or during) the block: ``bytes`` (unique storages, parameters excluded),
    ``count`` (saved tensors seen, duplicates included), ``by_dtype`` (bytes per dtype).
    ``exclude`` adds tensors whose storages must not count (frozen buffers, inputs kept anyway).
    The storages stay alive as long as the graph does, so a pointer is not reused while counting.
    """

    def __init__(self, exclude: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self.count = 0
        self.by_dtype: dict[str, int] = defaultdict(int)
        self._hooks: Any = None

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if not _is_parameter(t):
            key = _storage_key(t)
            if key not in self._excluded and key not in self._seen:
                nbytes = t.untyped_storage().nbytes()
                self._seen[key] = nbytes
                self.by_dtype[str(t.dtype).replace("torch.", "")] += nbytes
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` and return ``(bytes saved for backward, fn's result)``.

    Keep the result alive while you need the graph; the bytes are counted as the graph is built.
    """
    with SavedTensorCounter() as counter:
        result = fn(*args, **kwargs)
    return counter.bytes, result


# -- peak memory -----------------------------------------------------------------------------------


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _nvml_used_bytes(device: torch.device) -> int | None:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # NVML absent in containers without the driver library: report nothing
        return None


@dataclass
class MemoryReport:
    """What :class:`PeakMemory` measured, in bytes; ``None`` where the source is unavailable."""

    device: str
    peak_allocated: int | None = None  # CUDA caching allocator peak during the region
    baseline_allocated: int | None = None  # CUDA allocated at entry
    nvml_used_before: int | None = None  # device-wide used memory at entry (NVML)
    nvml_used_after: int | None = None  # device-wide used memory at exit (NVML)
    peak_rss: int | None = None  # process high-water RSS (CPU)
    rss_before: int | None = None
    peak_rss_reset: bool = False  # True when the RSS peak was reset at entry (else lifetime peak)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_delta(self) -> int | None:
        """Peak above the entry level: allocator on CUDA, RSS on CPU."""
        if self.peak_allocated is not None and self.baseline_allocated is not None:
            return self.peak_allocated - self.baseline_allocated
        if self.peak_rss is not None and self.rss_before is not None:
            return self.peak_rss - self.rss_before
        return None


class PeakMemory:
    """Context manager measuring peak memory over its block on ``device`` (CUDA or CPU).

    ``with PeakMemory("cuda") as pm: ...``; then ``pm.report`` (a :class:`MemoryReport`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.report = MemoryReport(device=str(self.device))

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.report.baseline_allocated = torch.cuda.memory_allocated(self.device)
            self.report.nvml_used_before = _nvml_used_bytes(self.device)
        else:
            self.report.peak_rss_reset = _reset_peak_rss()
            rss = _read_status_kib("VmRSS")
            self.report.rss_before = rss * 1024 if rss is not None else None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.report.peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.report.nvml_used_after = _nvml_used_bytes(self.device)
        else:
            hwm = _read_status_kib("VmHWM")
            self.report.peak_rss = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()

"""Probes: peak memory of one iteration (CPU RSS, CUDA allocator, NVML) and per-call velocity timing.

Why these and not tracemalloc: tracemalloc only sees Python's allocator, never torch's buffers.
On CPU the honest number is the process resident set: we reset the kernel's high-water mark
(``/proc/self/clear_refs`` = 5, Linux >= 4.0) after the model is built, run one iteration, and read
``VmHWM`` back. glibc keeps freed blocks in its arenas, so a second point in the same process would
reuse them without raising RSS; the memory suite therefore measures each point in a fresh process.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["PeakMemory", "VelocityTimer", "rss_bytes", "is_oom", "synchronizer", "saved_tensor_counter", "saved_bytes_of"]


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int | None:
    """Current resident set size of this process (``VmRSS``), or None off Linux."""
    return _status_kib("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory and CPU allocation failures (recorded as ``status: oom``)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate" in text


class _NvmlPoller:
    """Samples NVML 'used' memory of GPU 0 every ``interval`` seconds; keeps the maximum."""

    def __init__(self, index: int, interval: float = 0.005) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.peak = max(self.peak, used)
            time.sleep(self._interval)

    def __enter__(self) -> "_NvmlPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))
        self._nvml.nvmlShutdown()


@dataclass
class PeakMemory:
    """Context manager: peak memory above the level at entry, for one iteration.

    CPU: ``peak_bytes`` = VmHWM - VmRSS at entry (``hwm_reset`` says whether the high-water mark
    could be reset at entry; if not, the peak may include earlier allocations and is only an upper
    bound). CUDA: ``peak_bytes`` = ``max_memory_allocated`` - ``memory_allocated`` at entry, plus
    ``nvml_peak_bytes`` (device-wide, includes the CUDA context and the caching allocator's slack).
    """

    device: torch.device
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    hwm_reset: bool | None = None
    nvml_peak_bytes: int | None = None
    nvml_baseline_bytes: int | None = None
    _nvml: Any = field(default=None, repr=False)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            try:
                self._nvml = _NvmlPoller(self.device.index or 0).__enter__()
            except Exception:  # noqa: BLE001 - NVML missing: allocator figures still stand
                self._nvml = None
        else:
            self.baseline_bytes = rss_bytes()
            self.hwm_reset = _reset_hwm()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - (self.baseline_bytes or 0)
            if self._nvml is not None:
                self._nvml.__exit__(*exc)
                self.nvml_peak_bytes = self._nvml.peak - self._nvml.baseline
                self.nvml_baseline_bytes = self._nvml.baseline
        else:
            hwm = _status_kib("VmHWM")
            if hwm is not None and self.baseline_bytes is not None:
                self.peak_bytes = max(0, hwm - self.baseline_bytes)

    def as_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"peak_bytes": self.peak_bytes, "baseline_bytes": self.baseline_bytes}
        if self.device.type == "cuda":
            rec["peak_source"] = "cuda_max_memory_allocated"
            rec["nvml_peak_bytes"] = self.nvml_peak_bytes
        else:
            rec["peak_source"] = "rss_vmhwm" if self.hwm_reset else "rss_vmhwm_not_reset"
        return rec


def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on CUDA (timings must wait for the kernels), a no-op on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class VelocityTimer:
    """Transparent proxy over a VelocityModel that times each ``velocity`` call by grad mode.

    Calls under ``no_grad``/``inference_mode`` are the rollout; calls with grad enabled are the
    forward-with-grad of the gradient part. Set ``active = False`` around ``backward()`` so that
    recomputation inside backward (checkpointing) is not counted as forward time.
    Everything else is delegated to the wrapped model.
    """

    def __init__(self, model: Any, sync: Callable[[], None]) -> None:
        self._model = model
        self._sync = sync
        self.active = True
        self.reset()

    def reset(self) -> None:
        self.rollout_s = 0.0
        self.grad_forward_s = 0.0
        self.rollout_calls = 0
        self.grad_calls = 0

    def velocity(self, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
        if not self.active:
            return self._model.velocity(x, sigma, cond)
        grad = torch.is_grad_enabled()
        self._sync()
        t0 = time.perf_counter()
        out = self._model.velocity(x, sigma, cond)
        self._sync()
        dt = time.perf_counter() - t0
        if grad:
            self.grad_forward_s += dt
            self.grad_calls += 1
        else:
            self.rollout_s += dt
            self.rollout_calls += 1
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def saved_tensor_counter() -> Any:
    """A fresh ``leapalign.profiling.saved_tensor_bytes`` counter (context manager) for one forward.

    Bytes saved for backward are counted by leapalign's profiler (saved_tensors_hooks, unique
    storages, parameters excluded); the benchmarks only read it, so every suite and the library's
    own reports count the same way.
    """
    from leapalign.profiling import saved_tensor_bytes

    return saved_tensor_bytes()


def saved_bytes_of(counter: Any) -> int | None:
    """The byte count a finished :func:`saved_tensor_counter` holds."""
    if counter is None:
        return None
    for attr in ("bytes", "total_bytes", "nbytes"):
        if hasattr(counter, attr):
            return int(getattr(counter, attr))
    return int(counter)

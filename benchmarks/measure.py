"""Probes the suites share: device-wide NVML peak, per-call velocity timing, OOM detection, and the
bridge to leapalign's saved-bytes counter.

Peak memory itself is ``leapalign.profiling.PeakMemory`` (CUDA allocator peak; on CPU the process
RSS high-water mark, reset through ``/proc/self/clear_refs``) -- tracemalloc never sees torch's
buffers. glibc keeps freed blocks in its arenas, so a second point in the same process would reuse
them without raising RSS; the memory suite therefore measures each CPU point in a fresh process.
NVML is only read before/after by the profiler; :class:`NvmlPeak` polls it during the iteration.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

__all__ = ["NvmlPeak", "VelocityTimer", "is_oom", "synchronizer", "saved_tensor_counter", "saved_bytes_of"]


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory and CPU allocation failures (recorded as ``status: oom``)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate" in text


class NvmlPeak:
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

    def __enter__(self) -> "NvmlPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))
        self._nvml.nvmlShutdown()


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
    Everything else is delegated to the wrapped model. ``clock`` reads the time (wall by default;
    ``time.process_time`` for the CPU time of a one-thread run on a shared machine).
    """

    def __init__(self, model: Any, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self._model = model
        self._sync = sync
        self._clock = clock
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
        t0 = self._clock()
        out = self._model.velocity(x, sigma, cond)
        self._sync()
        dt = self._clock() - t0
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
    """A fresh ``leapalign.profiling.SavedTensorCounter`` (context manager) for one forward.

    Bytes saved for backward are counted by leapalign's profiler (saved_tensors_hooks, unique
    storages, parameters excluded); the benchmarks only read it, so every suite and the library's
    own reports count the same way. Tensors saved *inside* a non-reentrant checkpoint region are
    not seen; the checkpoint's inputs are -- which is what checkpointing keeps until backward.
    """
    from leapalign.profiling import SavedTensorCounter

    return SavedTensorCounter()


def saved_bytes_of(counter: Any) -> int | None:
    """The byte count a finished :func:`saved_tensor_counter` holds (None without a counter)."""
    return None if counter is None else int(counter.bytes)

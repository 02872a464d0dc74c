"""CPU threads for the shapes-world runs: as many as the machine has free, never more.

On a 2-core machine that other jobs keep busy, two torch threads are *slower* than one (measured:
17 s per demo step with 2 threads at load average 7, 1.7 s with 1), because OpenMP workers spin
while waiting for a core. :func:`choose_threads` therefore uses the 1-minute load average: the
free cores are ``cpu_count - load``, and the demo takes ``min(max_threads, free)``, at least one.
:func:`passive_wait` asks OpenMP to sleep rather than spin between parallel regions; it only works if
set before torch loads OpenMP, which is why :mod:`leapalign.shapes.demo` calls it before ``import torch``.

The thread count is recorded with every result: it could change the order of parallel sums.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

__all__ = ["ThreadChoice", "passive_wait", "choose_threads"]

_OMP_POLICY: list[str] = []  # what passive_wait() found or set


def passive_wait() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or torch (hence OpenMP) is already
    loaded, too late for it to count. Returns (and remembers) the policy in effect."""
    if "OMP_WAIT_POLICY" in os.environ:
        policy = os.environ["OMP_WAIT_POLICY"]
    elif "torch" in sys.modules:
        policy = "default (torch was loaded before it could be set)"
    else:
        os.environ["OMP_WAIT_POLICY"] = policy = "PASSIVE"
    _OMP_POLICY[:] = [policy]
    return policy


@dataclass(frozen=True)
class ThreadChoice:
    """The torch thread count a run uses, and why."""

    threads: int
    reason: str
    cpu_count: int
    load_average_1min: float | None
    omp_wait_policy: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads > 1 else ''} ({self.reason}); OpenMP wait policy {self.omp_wait_policy}"


def choose_threads(requested: int | None = None, max_threads: int = 2) -> ThreadChoice:
    """``requested`` threads if given (> 0), else ``min(max_threads, free cores)`` with free = cpus - load, >= 1."""
    cpus = os.cpu_count() or 1
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    policy = _OMP_POLICY[0] if _OMP_POLICY else os.environ.get("OMP_WAIT_POLICY", "default")
    if requested is not None and requested > 0:
        return ThreadChoice(requested, "asked for with --threads", cpus, load, policy)
    if load is None:
        return ThreadChoice(1, "load average unknown: one thread", cpus, load, policy)
    free = int(cpus - load + 0.5)
    n = max(1, min(max_threads, free))
    return ThreadChoice(n, f"auto: load average {load:.1f} on {cpus} cores, {max(free, 0)} free, at most {max_threads}", cpus, load, policy)

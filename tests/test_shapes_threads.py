"""Thread choice of the shapes-world runs: never more threads than free cores, OpenMP told to sleep."""
from __future__ import annotations

import os
import subprocess
import sys

from leapalign.shapes import threads


def test_choose_threads_uses_the_free_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.choose_threads().threads == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))  # the shared machine: one thread, not two
    busy = threads.choose_threads()
    assert busy.threads == 1 and "load average 7.0" in busy.reason and busy.load_average_1min == 7.0
    assert threads.choose_threads(3).threads == 3  # asked for: obeyed
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert threads.choose_threads().threads == 2  # capped: the tiny model gains nothing past 2
    assert "torch thread" in threads.choose_threads().describe()


def _policy_after(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_passive_wait_is_set_before_torch_loads_openmp():
    assert _policy_after("import os, leapalign.shapes.demo; print(os.environ.get('OMP_WAIT_POLICY'))") == "PASSIVE"
    late = _policy_after("import torch; from leapalign.shapes.threads import passive_wait; print(passive_wait())")
    assert late.startswith("default (torch was loaded")

"""The ``machine`` block every result file carries: a benchmark without its machine is not a result.

Gathered once per suite run, in the parent process, and copied verbatim into JSON and Markdown.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

__all__ = ["machine_info", "command_line"]


def command_line(argv: list[str] | None = None) -> str:
    """The exact command that reproduces a run: ``python -m benchmarks SUITE ARGS...``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "benchmarks", *args])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing optional package is a fact to record, not an error
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (results from a dirty tree say so)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _gpu_block() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    block: dict[str, Any] = {
        "name": props.name,
        "total_memory_bytes": int(props.total_memory),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        block["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML is optional; its absence is recorded as a missing key
        pass
    return block


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """CPU/GPU names, core count, RAM, library versions, git commit, UTC time and the command line."""
    import torch

    return {
        "command": command_line(argv),
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "ram_bytes": _total_ram_bytes(),
        "gpu": _gpu_block(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "source_dir": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }

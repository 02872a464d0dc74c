"""Fault-injection points for the kill/resume tests (off unless an environment variable names them).

``LEAPALIGN_FAULT=POINT@STEP[:ACTION]`` makes the process act when it reaches ``POINT`` while working
on optimiser step ``STEP`` (1-based, as in ``metrics.jsonl`` and checkpoint names). Points:
``mid-step`` (after a micro-batch's forward, before its backward), ``mid-save`` (a checkpoint's
weights written, the rest not), ``before-pointer`` (the checkpoint renamed into place, the
``latest`` pointer not yet replaced). Actions: ``kill`` (default: SIGKILL to itself, no cleanup
runs, exactly like ``kill -9``) or ``pause`` (create ``$LEAPALIGN_FAULT_RELEASE.waiting`` and
wait until ``$LEAPALIGN_FAULT_RELEASE`` exists). Several specs may be given, comma-separated.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["POINTS", "fault_point"]

POINTS = ("mid-step", "mid-save", "before-pointer")
_ENV = "LEAPALIGN_FAULT"


def _specs() -> list[tuple[str, int, str]]:
    out = []
    for spec in filter(None, os.environ.get(_ENV, "").split(",")):
        where, _, action = spec.partition(":")
        point, _, step = where.partition("@")
        if point not in POINTS or not step.isdigit() or action not in ("", "kill", "pause"):
            raise ValueError(f"{_ENV}={spec!r}: expected POINT@STEP[:kill|pause] with POINT in {POINTS}")
        out.append((point, int(step), action or "kill"))
    return out


def fault_point(point: str, step: int) -> None:
    """Act on ``point`` at ``step`` when ``LEAPALIGN_FAULT`` asks for it; otherwise do nothing."""
    if _ENV not in os.environ:
        return
    for want, at, action in _specs():
        if want == point and at == step:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            release = Path(os.environ["LEAPALIGN_FAULT_RELEASE"])
            release.with_name(release.name + ".waiting").touch()
            while not release.exists():
                time.sleep(0.05)

"""One run per output folder: the folder's lock, its run id, and its ``metrics.jsonl``.

A run holds an exclusive OS lock (``fcntl.flock``) on ``<output_dir>/.leapalign.lock`` for its whole
life. The kernel drops it when the process ends, however it ends, so a ``kill -9`` never leaves a
stale lock; a second run into the same folder is refused with the holder's PID. ``run.json``
names the run (its id is stamped on every checkpoint and temporary it writes, see
:mod:`leapalign.training.checkpoint_dir`). A new run into a folder that holds another run is
refused unless it resumes it (``ckpt_resume_from: latest`` or a checkpoint of that folder) or is
told ``overwrite``, which moves the old run aside to ``<output_dir>.replaced-<timestamp>`` (never
deleting it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leapalign.training.checkpoint_dir import atomic_write_text, checkpoint_root, list_checkpoints
from leapalign.training.errors import RunDirError

__all__ = ["LOCK_FILE", "RUN_FILE", "RunClaim", "check_output_dir", "check_claimable", "claim_run_dir", "append_metrics", "truncate_metrics"]

logger = logging.getLogger("leapalign.trainer")

LOCK_FILE = ".leapalign.lock"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunClaim:
    """This process's hold on an output folder (re-entrant: claiming a held folder again reuses it)."""

    path: Path
    run_id: str
    fd: int
    holders: int = 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            _CLAIMS.pop(str(self.path), None)
            os.close(self.fd)  # closing the descriptor drops the flock


_CLAIMS: dict[str, RunClaim] = {}


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a resolved path if it is (or can be created as) a writable folder; nothing is written."""
    path = Path(output_dir).expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise RunDirError(f"output_dir={str(output_dir)!r} is an existing file, not a folder")
    if not probe.is_dir():
        raise RunDirError(f"output_dir={str(output_dir)!r} cannot be created: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created: {str(probe)!r} is not writable"
        raise RunDirError(f"output_dir={str(output_dir)!r} {what}")
    return path


def _previous_run(path: Path) -> str | None:
    """A short description of the run ``path`` holds, or None when it holds none."""
    ckpts = list_checkpoints(path)
    run = path / RUN_FILE
    if not (run.is_file() or ckpts or (path / METRICS_FILE).is_file()):
        return None
    run_id = _read_run_id(path) or "unnamed"
    last = f", last checkpoint {ckpts[-1].name}" if ckpts else ", no checkpoint"
    return f"run {run_id}{last}"


def _read_run_id(path: Path) -> str | None:
    try:
        return str(json.loads((path / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _busy(shown: str, fd: int) -> RunDirError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return RunDirError(f"output_dir={shown!r} is in use by another run (PID {holder}); "
                       "wait for it to end or choose another output_dir")


def _lock(path: Path, shown: str) -> int:
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        error = _busy(shown, fd)
        os.close(fd)
        raise error from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _move_aside(path: Path) -> Path:
    """Move everything in ``path`` but the lock into ``<path>.replaced-<timestamp>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.replaced-{stamp}-{n}"), n + 1
    aside.mkdir()
    for entry in path.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, aside / entry.name)
    return aside


def _continues(resume_from: str | None, path: Path) -> bool:
    """Whether ``ckpt_resume_from`` continues the run in ``path`` (``latest``, or one of its checkpoints)."""
    if resume_from is None:
        return False
    if resume_from == "latest":
        return True
    return Path(resume_from).expanduser().resolve().parent == checkpoint_root(path)


def _settle(path: Path, shown: str, resume_from: str | None, overwrite: bool) -> tuple[str | None, bool]:
    """``(previous run, continuing it)``; refuses a new run over another unless ``overwrite``."""
    previous = _previous_run(path) if path.is_dir() else None
    continuing = previous is not None and _continues(resume_from, path)
    if previous is not None and not continuing and not overwrite:
        raise RunDirError(
            f"output_dir={shown!r} already holds another run ({previous}); resume it with --resume latest, "
            "move it aside with --overwrite, or choose another output_dir")
    return previous, continuing


def check_claimable(output_dir: str | Path, resume_from: str | None = None, overwrite: bool = False) -> None:
    """What :func:`claim_run_dir` would refuse, found without writing anything."""
    import fcntl

    path = check_output_dir(output_dir)
    if str(path) in _CLAIMS:
        return
    lock = path / LOCK_FILE
    if lock.is_file():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise _busy(str(output_dir), fd) from None
        finally:
            os.close(fd)
    _settle(path, str(output_dir), resume_from, overwrite)


def claim_run_dir(output_dir: str | Path, resume_from: str | None = None, overwrite: bool = False) -> RunClaim:
    """Lock ``output_dir`` for this run and settle who owns it (see the module docstring)."""
    path = check_output_dir(output_dir)
    if str(path) in _CLAIMS:
        claim = _CLAIMS[str(path)]
        claim.holders += 1
        return claim
    fd = _lock(path, str(output_dir))
    try:
        previous, continuing = _settle(path, str(output_dir), resume_from, overwrite)
        if previous is not None and not continuing:
            logger.warning("output_dir %s held %s: moved aside to %s", output_dir, previous, _move_aside(path))
        run_id = (_read_run_id(path) if continuing else None) or uuid.uuid4().hex[:12]
        atomic_write_text(path / RUN_FILE, json.dumps({"run_id": run_id, "pid": os.getpid(), "started": time.time()}) + "\n")
    except BaseException:
        os.close(fd)
        raise
    claim = RunClaim(path, run_id, fd)
    _CLAIMS[str(path)] = claim
    return claim


def _jsonable(metrics: dict[str, float]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def append_metrics(output_dir: str | Path, metrics: dict[str, float]) -> None:
    """One line of ``metrics.jsonl``; non-finite values are written as strings (``"nan"``)."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(_jsonable(metrics)) + "\n")


def truncate_metrics(output_dir: str | Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` lines after ``step`` (a resumed run logs those steps again)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if float(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic_write_text(path, "".join(x + "\n" for x in kept))

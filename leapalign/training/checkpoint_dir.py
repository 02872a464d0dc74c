"""Checkpoint folders on disk: atomic creation, the ``latest`` pointer, listing, pruning, resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-NNNNNNNN/`` that appears only through a
rename: everything is written into a hidden temporary sibling (``.tmp-<run>-step-...``), flushed,
and then ``os.replace``-d into place, so a kill at any moment leaves either the previous checkpoints
untouched or the new one complete -- never a half-written directory under a real name. The
``latest`` pointer file is replaced the same way, after the rename; when it is missing or names
a folder that is gone, the newest complete ``step-*`` directory wins, so ``latest`` never resolves
to a missing folder.

Every temporary and every checkpoint carries the id of the run that wrote it (the temporary in its
name, the checkpoint in ``trainer_state.json``): cleaning up temporaries and pruning old
checkpoints touch only the calling run's own. What goes inside a checkpoint is
:mod:`leapalign.training.checkpointing`'s business.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from leapalign.training.errors import CheckpointError
from leapalign.training.faults import fault_point

__all__ = [
    "CheckpointError",
    "TRAINER_STATE",
    "checkpoint_root",
    "checkpoint_name",
    "write_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "prune_checkpoints",
    "read_trainer_state",
    "atomic_write_text",
]

_NAME_RE = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tmp_prefix(run_id: str) -> str:
    return f".tmp-{run_id or 'anon'}-"


def write_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None], run_id: str = "") -> Path:
    """Create ``checkpoints/step-NNNNNNNN`` atomically: ``write(tmp_dir)`` fills a temporary directory
    which is then renamed into place and made ``latest``. Leftover temporaries of this run's killed
    saves are removed first (another run's never are). Returns the final directory."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    prefix = _tmp_prefix(run_id)
    for stale in root.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{prefix}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside, then swap
            old = root / f"{prefix}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("before-pointer", step)
    atomic_write_text(root / "latest", final.name + "\n")
    return final


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries are never listed); only ``run_id``'s when given."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name) and (p / TRAINER_STATE).is_file()]
    if run_id is not None:
        found = [p for p in found if _run_of(p) == run_id]
    return sorted(found, key=lambda p: int(_NAME_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _run_of(path: Path) -> str | None:
    try:
        return json.loads((path / TRAINER_STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``latest`` pointer's checkpoint if it is complete, else the newest complete one, else None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = root / name
        if _NAME_RE.match(name) and (cand / TRAINER_STATE).is_file():
            return cand
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> newest in ``output_dir`` (None if there is none yet);
    a path -> that checkpoint, which must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"ckpt_resume_from={resume_from!r} is not a checkpoint directory (no {TRAINER_STATE})")
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int, run_id: str | None = None) -> None:
    """Delete all but the ``keep_last`` newest of ``run_id``'s checkpoints (0 keeps everything); the
    one ``latest`` names is always kept."""
    if keep_last <= 0:
        return
    keep = latest_checkpoint(output_dir)
    for old in list_checkpoints(output_dir, run_id)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc

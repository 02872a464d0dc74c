"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<output_dir>/checkpoints/step-NNNNNNNN/`` that appears only through a
rename: everything is written into a hidden temporary sibling (``.tmp-step-...``), flushed, and
then ``os.replace``-d into place, so a kill at any moment leaves either the previous checkpoints
untouched or the new one complete -- never a half-written directory under a real name. The
``latest`` pointer file is replaced the same way; when it is missing or stale the newest complete
``step-*`` directory wins.

Layout::

    trainer_state.json       step, fault counters, world size, the config
    trainable.safetensors    the raw trainable weights (full tensors, gathered under FSDP)
    ema.safetensors          their EMA (when EMA is on)
    optimizer.pt             AdamW state (full, keyed like the optimiser's own state_dict)
    scheduler.pt             LR scheduler state
    rng.pt                   torch / CUDA / numpy / python RNG state of every rank
    lora/                    diffusers-format LoRA (EMA weights) -- FluxPipeline.load_lora_weights reads it
    transformer/             or, for full fine-tunes: config.json + diffusion_pytorch_model.safetensors (EMA)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CheckpointError",
    "checkpoint_root",
    "checkpoint_name",
    "write_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "prune_checkpoints",
    "read_trainer_state",
    "atomic_write_text",
    "capture_rng_state",
    "restore_rng_state",
]

_NAME_RE = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or written; the message names the path."""


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


def write_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None]) -> Path:
    """Create ``checkpoints/step-NNNNNNNN`` atomically: ``write(tmp_dir)`` fills a temporary directory
    which is then renamed into place and made ``latest``. Leftover temporaries of killed saves are
    removed first. Returns the final directory."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside, then swap
            old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME_RE.match(p.name).group(1)))  # type: ignore[union-attr]


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


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}") from exc


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may touch: torch CPU, CUDA (all devices), numpy, python, named generators."""
    import random

    import numpy as np

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (generators or {}).items():
        state[f"generator/{name}"] = gen.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        key = f"generator/{name}"
        if key in state:
            gen.set_state(state[key])

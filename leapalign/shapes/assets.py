"""Where the shapes world's shipped checkpoints live, and the one file format they share.

A checkpoint is a pair of files: ``{name}.safetensors`` (fp32 weights) and ``{name}.json``
(``{"config": ..., "meta": ...}``: what rebuilds the module, and how it was made). The shapes model
(:mod:`leapalign.shapes.model`) and the learned scorer (:mod:`leapalign.shapes.scorer`) are saved and
found this way; ``leapalign/assets/README.md`` tells how the shipped ones were made.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ASSETS_DIR", "add_training_args", "training_meta", "checkpoint_files", "load_checkpoint", "save_checkpoint"]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def checkpoint_files(path: str | Path | None, default_name: str, what: str, how: str) -> tuple[Path, Path]:
    """``(weights, json)`` of a checkpoint, both checked to exist.

    ``path`` may be the ``.safetensors`` file, its ``.json`` or a directory holding
    ``{default_name}.safetensors``; ``None`` means the shipped one in :data:`ASSETS_DIR`. A missing
    file raises ``FileNotFoundError`` naming it (a ``what`` file), ``path`` and ``how`` to make one.
    """
    p = Path(path) if path is not None else ASSETS_DIR / f"{default_name}.safetensors"
    if p.is_dir():
        p = p / f"{default_name}.safetensors"
    weights, config = p.with_suffix(".safetensors"), p.with_suffix(".json")
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{what} file {f} not found (path={path!r}); {how}")
    return weights, config


def load_checkpoint(path: str | Path | None, default_name: str, what: str, how: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the parsed JSON (``{"config": ..., "meta": ...}``) of :func:`checkpoint_files`."""
    weights, config = checkpoint_files(path, default_name, what, how)
    return load_file(str(weights)), json.loads(config.read_text())


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor], config: dict[str, Any], out_dir: str | Path, name: str, meta: dict | None = None
) -> Path:
    """Write ``{name}.safetensors`` (``tensors`` as contiguous fp32 on CPU) and ``{name}.json``; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(weights))
    (out / f"{name}.json").write_text(json.dumps({"config": config, "meta": meta or {}}, indent=2) + "\n")
    return weights


def add_training_args(parser: argparse.ArgumentParser, default_name: str, steps: int, batch_size: int, lr: float) -> None:
    """The flags every command that trains a checkpoint shares: where it goes (``--out``, ``--name``),
    ``--steps``, ``--batch-size``, ``--lr``, ``--seed`` and ``--threads``, with that command's defaults."""
    parser.add_argument("--out", type=Path, default=Path("leapalign/assets"), help="directory for the .safetensors and .json")
    parser.add_argument("--name", default=default_name, help="file stem of the checkpoint")
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")


def training_meta(module: str, argv: Sequence[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The start of a trained checkpoint's ``meta``: the command that made it (``python -m module ...``)
    and the :func:`add_training_args` values that shaped the run."""
    command = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    return {"command": command, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size}

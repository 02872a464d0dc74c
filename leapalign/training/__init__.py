"""The training layer: the trainer loop, its wiring (LoRA, FSDP2, leapkernels patching, EMA,
optimiser), checkpoints, the output folder's ownership, and the config.

It imports the core (``leapalign.flow``, ``adapters``, ``objectives``, ``rewards``, ``prompts``,
``sampling``, ``dtypes``) and is imported only by ``leapalign.cli`` and the experiments on top
(``leapalign.shapes``, ``benchmarks``). Names are re-exported lazily so that reading a config (the
CLI's ``--help``, validation) does not import accelerate, peft or diffusers' pipelines.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LeapAlignConfig": "leapalign.training.config",
    "RewardSpec": "leapalign.training.config",
    "ConfigError": "leapalign.training.errors",
    "CheckpointError": "leapalign.training.errors",
    "RunDirError": "leapalign.training.errors",
    "RewardGradientError": "leapalign.training.errors",
    "NonFiniteLossError": "leapalign.training.errors",
    "LeapAlignTrainer": "leapalign.training.trainer",
    "TrainResult": "leapalign.training.trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leapalign.training' has no attribute {name!r}")

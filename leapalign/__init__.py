"""leapalign: LeapAlign post-training of flow-matching text-to-image models on fused kernels.

The main entry points are re-exported lazily (importing ``leapalign`` stays cheap for the CLI):

    from leapalign import LeapAlignConfig, LeapAlignTrainer
    trainer = LeapAlignTrainer(LeapAlignConfig(...), pipeline, reward)
    trainer.train()
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LeapAlignConfig": "leapalign.training.config",
    "LeapAlignTrainer": "leapalign.training.trainer",
    "build_objective": "leapalign.objectives",
    "LeapAlignObjective": "leapalign.objectives.leapalign",
    "LeapAlignObjectiveConfig": "leapalign.objectives.leapalign",
    "FluxVelocityModel": "leapalign.adapters.flux",
    "FluxConditioning": "leapalign.adapters.flux",
    "build_reward": "leapalign.rewards",
    "plan": "leapalign.training.plan",
    "PlanReport": "leapalign.training.plan",
    "velocity_model_from_pipeline": "leapalign.adapters",
    "Flux2VelocityModel": "leapalign.adapters.flux2",
    "SD3VelocityModel": "leapalign.adapters.sd3",
    "CompiledRollout": "leapalign.rollout_engine",
    "RolloutEngineConfig": "leapalign.rollout_engine",
    "wrap_rollout": "leapalign.rollout_engine",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'leapalign' has no attribute {name!r}")

"""Objectives: LeapAlign and its baselines behind one interface, built by name.

``build_objective("leapalign", alpha=0.1, num_steps=25)`` -> an :class:`Objective` whose call on a
micro-batch returns ``ObjectiveOutput(loss, rewards, images, metrics)``. Every built-in objective is a
:class:`RolloutObjective` (fresh noise -> its gradient window -> decode, score, hinge loss) and
writes only its :class:`GradientWindow`.
"""
from __future__ import annotations

from typing import Any

from leapalign.objectives.base import GradientWindow, Objective, ObjectiveOutput, RolloutObjective
from leapalign.objectives.baselines import (
    AlignPropObjective,
    DraftKObjective,
    DraftLVObjective,
    DRTuneObjective,
    FullBackpropObjective,
    ReFLObjective,
)
from leapalign.objectives.leapalign import LeapAlignObjective, LeapAlignObjectiveConfig

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOutput",
    "RolloutObjective",
    "GradientWindow",
    "LeapAlignObjective",
    "LeapAlignObjectiveConfig",
    "build_objective",
]

OBJECTIVES: dict[str, type[Objective]] = {
    "leapalign": LeapAlignObjective,
    "full_backprop": FullBackpropObjective,
    "draft_k": DraftKObjective,
    "draft_lv": DraftLVObjective,
    "refl": ReFLObjective,
    "drtune": DRTuneObjective,
    "alignprop": AlignPropObjective,
}


def build_objective(name: str, **config: Any) -> Objective:
    """The objective registered as ``name`` (see :data:`OBJECTIVES`), configured by keyword.

    Unknown names and unknown config keys raise with the valid choices listed.
    """
    key = name.lower().replace("-", "_")
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective name={name!r}; expected one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[key]
    config_class = getattr(cls, "config_class", None) or LeapAlignObjectiveConfig
    try:
        cfg = config_class(**config)
    except TypeError as err:
        fields = sorted(getattr(config_class, "__dataclass_fields__", {}))
        raise TypeError(f"bad config for objective {key!r}: {err}; valid fields: {fields}") from None
    return cls(cfg)

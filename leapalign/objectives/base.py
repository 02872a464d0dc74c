"""One interface for LeapAlign and every baseline: one call per micro-batch -> loss and metrics.

The trainer and the benchmarks only ever see :class:`Objective`; swapping LeapAlign for DRaFT-K or
naive full-trajectory backprop is a config change.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from leapalign.adapters.base import VelocityModel
from leapalign.rewards.base import RewardFn


@dataclass
class ObjectiveOutput:
    """What one micro-batch produces.

    ``loss`` is a differentiable scalar (call ``.backward()`` on it); ``rewards`` ``[B]`` and
    ``images`` ``[B, 3, H, W]`` are detached copies of what the reward saw; ``metrics`` are floats
    ready for a logger (e.g. ``reward_mean``, ``d_j``, ``d_0``, ``i_k``, ``i_j``).
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    images: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(abc.ABC):
    """Base class: subclasses hold a config dataclass in ``self.config`` and implement ``__call__``."""

    name: str = "objective"

    @abc.abstractmethod
    def __call__(
        self,
        model: VelocityModel,
        cond: Any,
        prompts: Sequence[str],
        reward: RewardFn,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Roll out from fresh noise for ``cond``'s batch, score it, return the loss to backprop."""

"""One interface for LeapAlign and every baseline: one call per micro-batch -> loss and metrics.

The trainer and the benchmarks only ever see :class:`Objective`; swapping LeapAlign for DRaFT-K or
naive full-trajectory backprop is a config change.

The built-in objectives share one skeleton, :class:`RolloutObjective`: draw the micro-batch's
noise, roll out with autograd only inside the objective's **gradient window** (the one thing that
makes each method itself), then decode, score and take the hinge loss. A subclass writes only
:meth:`RolloutObjective.window`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from leapalign.adapters.base import VelocityModel
from leapalign.objectives.leap_ops import hinge_loss
from leapalign.objectives.scoring import decode_and_score, start_rollout
from leapalign.rewards.base import RewardFn

__all__ = ["Objective", "ObjectiveOutput", "GradientWindow", "RolloutObjective"]


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


@dataclass
class GradientWindow:
    """What an objective's gradient window hands the shared scoring tail.

    ``latents [B, N, C]``: what the reward scores, attached to the graph where the method's gradient
    flows; ``metrics``: the method's own floats (drawn steps, distances); ``weight [B]``: an optional
    per-sample loss weight without gradient (LeapAlign's trajectory weight).
    """

    latents: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    weight: torch.Tensor | None = None


class RolloutObjective(Objective):
    """The skeleton of every built-in objective: fresh noise -> gradient window -> score -> loss.

    Subclasses set ``config_class`` (a dataclass with ``num_steps`` and ``hinge_lambda``) and write
    :meth:`window`. The loss is ``mean(relu(lambda - r) * w)`` (``-r`` when ``hinge_lambda`` is None,
    ``w = 1`` unless the window gives a weight); metrics always hold ``loss`` and ``reward_mean``.
    """

    config_class: type

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            raise TypeError(f"pass either a {self.config_class.__name__} or keyword overrides, not both")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __call__(self, model: Any, cond: Any, prompts: Sequence[str], reward: RewardFn,
                 generator: torch.Generator | None = None) -> ObjectiveOutput:
        _, sigmas, noise = start_rollout(model, cond, prompts, self.config.num_steps, generator)
        return self.score(model, self.window(model, cond, noise, sigmas, generator), prompts, reward)

    @abc.abstractmethod
    def window(
        self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None
    ) -> GradientWindow:
        """Roll ``noise`` out over ``sigmas`` with autograd only where this method trains."""

    def score(self, model: Any, window: GradientWindow, prompts: Sequence[str], reward: RewardFn) -> ObjectiveOutput:
        """Decode and score ``window.latents``; the (weighted) hinge loss and the shared metrics."""
        with torch.enable_grad():
            rewards, images = decode_and_score(model, window.latents, prompts, reward)
            per_sample = hinge_loss(rewards, self.config.hinge_lambda)
            if window.weight is not None:
                per_sample = per_sample * window.weight.to(rewards.device)
            loss = per_sample.mean()
        metrics = {"loss": float(loss.detach()), "reward_mean": float(rewards.detach().mean()), **window.metrics}
        return ObjectiveOutput(loss=loss, rewards=rewards.detach(), images=images.detach(), metrics=metrics)

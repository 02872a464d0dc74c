"""The reward the shapes-world alignment runs maximise, built on the learned scorer.

``score`` is the scorer's probability (with the objective's hinge), ``log_score`` its log; either can
subtract ``penalty x`` :func:`background_penalty`, a differentiable prior against the faint
background textures a hacked scorer rewards (the demo's default, penalty 5; see
``leapalign/assets/README.md`` for the runs behind it).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from leapalign.shapes.world import BACKGROUND

__all__ = ["REWARDS", "LogScoreReward", "background_penalty", "PenalisedReward", "training_reward"]


class LogScoreReward:
    """``log p`` of the scorer (``logsigmoid`` of its logits): a ``RewardFn`` whose gradient does not
    vanish where the scorer's sigmoid saturates near 0, which is where most samples of a weak model sit."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(self.scorer.logits(images, prompts))


REWARDS = ("score", "log_score")


def background_penalty(images: torch.Tensor, tol: float = 0.3, softness: float = 0.03) -> torch.Tensor:
    """``[B]``, differentiable: mean over pixels of the RGB distance ``d`` to the background colour, weighted
    by ``sigmoid((tol - d) / softness)`` -- faint off-background pixels (the textures a hacked scorer
    rewards, which the evaluator reads as background) count fully, object colours (``d >= 0.55``) not at all."""
    bg = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    d = (images - bg).square().sum(1).add(1e-8).sqrt()
    return (d * torch.sigmoid((tol - d) / softness)).mean((1, 2))


class PenalisedReward:
    """``reward(images) - weight * background_penalty(images)``: the scorer with a prior against background texture."""

    def __init__(self, reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], weight: float) -> None:
        self.reward, self.weight = reward, weight

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(images, prompts) - self.weight * background_penalty(images)


def training_reward(scorer: Any, name: str, penalty: float = 0.0) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
    """The reward the objective maximises: the scorer itself (``score``) or :class:`LogScoreReward`, minus
    ``penalty`` times :func:`background_penalty` when ``penalty`` > 0 (:class:`PenalisedReward`)."""
    if name == "score":
        reward = scorer
    elif name == "log_score":
        reward = LogScoreReward(scorer)
    else:
        raise ValueError(f"reward must be one of {REWARDS}, got {name!r}")
    return PenalisedReward(reward, penalty) if penalty > 0 else reward

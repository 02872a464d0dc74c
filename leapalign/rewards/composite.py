"""Several reward terms, each with a weight and a hinge, seen by the objective as one reward.

The objective's loss is ``relu(lambda - r)``. With terms ``r_i``, weights ``w_i`` and hinges
``lambda_i`` the composite reward is ``R = sum_i w_i min(r_i, lambda_i)``; when every term has a
hinge, :attr:`CompositeReward.hinge` is ``Lambda = sum_i w_i lambda_i`` and
``relu(Lambda - R) = sum_i w_i relu(lambda_i - r_i)`` exactly (each ``min`` caps at its hinge), so
"hinge lambda per reward" needs nothing from the objective beyond its one lambda.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from leapalign.rewards.base import RewardFn

__all__ = ["RewardTerm", "CompositeReward"]


@dataclass
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float = 1.0
    hinge: float | None = None


class CompositeReward:
    """``(images, prompts) -> [B]``: ``sum_i w_i min(r_i, hinge_i)``; the last raw means are kept for logging."""

    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        if not terms:
            raise ValueError("CompositeReward needs at least one reward term, got none")
        self.terms = list(terms)
        self.last_components: dict[str, float] = {}

    @property
    def hinge(self) -> float | None:
        """The objective's lambda that makes the composite hinge exact, or None if a term has no hinge."""
        if any(t.hinge is None for t in self.terms):
            return None
        return float(sum(t.weight * t.hinge for t in self.terms))  # type: ignore[operator]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = None
        for term in self.terms:
            r = term.fn(images, prompts)
            if not isinstance(r, torch.Tensor) or r.shape != (images.shape[0],):
                shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"reward term {term.name!r} must return a [{images.shape[0]}] tensor, got {shape}")
            self.last_components[f"reward/{term.name}"] = float(r.detach().float().mean())
            if term.hinge is not None:
                r = r.clamp(max=term.hinge)
            r = term.weight * r.float()
            total = r if total is None else total + r
        return total  # type: ignore[return-value]

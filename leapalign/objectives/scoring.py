"""Shared by every objective: draw the micro-batch's noise, decode latents and score them."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from leapalign.rewards.base import RewardFn, call_reward

__all__ = ["check_batch", "decode_and_score", "sample_sorted_steps"]


def check_batch(model: Any, cond: Any, prompts: Sequence[str]) -> int:
    """The micro-batch size, from ``prompts``; a conditioning that knows its batch must agree."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings (one per sample), got a single str")
    batch = len(prompts)
    if batch < 1:
        raise ValueError("prompts is empty; an objective needs at least one sample")
    cond_batch = getattr(cond, "batch_size", None)
    if cond_batch is not None and cond_batch != batch:
        raise ValueError(f"cond has batch size {cond_batch} but {batch} prompts were given; they must match")
    return batch


def start_rollout(
    model: Any, cond: Any, prompts: Sequence[str], num_steps: int, generator: torch.Generator | None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(batch, sigmas [T + 1], noise)`` for a fresh rollout, the batch checked first.

    Noise is drawn before anything else touches ``generator``, so one seed gives the same noise to
    every objective (benchmarks and studies compare methods on the same trajectories).
    """
    batch = check_batch(model, cond, prompts)
    return batch, model.sigmas(num_steps), model.noise(batch, generator)


def decode_and_score(
    model: Any, latents: torch.Tensor, prompts: Sequence[str], reward: RewardFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images = model.decode(latents)``; ``rewards = reward(images, prompts)`` with its contract checked."""
    images = model.decode(latents)
    rewards = call_reward(reward, images, prompts)
    return rewards, images


def sample_sorted_steps(low: int, high: int, count: int, generator: torch.Generator | None) -> list[int]:
    """``count`` distinct step indices drawn uniformly from ``[low, high)``, sorted ascending."""
    if high - low < count:
        raise ValueError(f"cannot draw {count} distinct steps from [{low}, {high})")
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(high - low, generator=generator, device=device)[:count]
    return sorted(int(i) + low for i in perm.tolist())

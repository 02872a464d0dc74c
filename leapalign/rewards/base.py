"""Reward contract: a differentiable callable ``(images [B,3,H,W] in [0,1], prompts) -> [B]``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


class RewardNotDifferentiableError(RuntimeError):
    """The reward returned a tensor with no path back to the images: the field's most common bug."""


def call_reward(reward: RewardFn, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and check its contract: shape ``[B]``, floating, finite-or-not, differentiable.

    Raises :class:`RewardNotDifferentiableError` when ``images`` needs grad and the result has no
    gradient path back to them: either the result does not require grad at all (a ``.detach()``,
    ``.item()``, PIL or numpy round-trip inside the reward), or it requires grad only through the
    reward model's own unfrozen weights (the same round-trip hidden behind a trainable scorer).
    The second check walks the reward's autograd graph once (no backward pass).
    """
    batch = images.shape[0]
    if len(prompts) != batch:
        raise ValueError(f"reward got {batch} images but {len(prompts)} prompts; they must match")
    rewards = reward(images, prompts)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"reward must return a torch.Tensor of shape [{batch}], got {type(rewards).__name__}")
    if rewards.shape != (batch,):
        raise ValueError(f"reward must return shape [{batch}] (one score per image), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"reward must return a floating tensor, got {rewards.dtype}")
    if images.requires_grad and torch.is_grad_enabled() and not rewards.requires_grad:
        raise RewardNotDifferentiableError(
            "the reward returned a tensor without a gradient path to the images (requires_grad=False). "
            "Keep preprocessing in torch (no PIL/numpy, no .detach()/.item()) so gradients reach the model."
        )
    if images.requires_grad and torch.is_grad_enabled() and not _graph_reaches(rewards, images):
        raise RewardNotDifferentiableError(
            "the reward's gradient does not reach the images: it requires grad only through the reward "
            "model's own weights. Keep preprocessing in torch (no PIL/numpy, no .detach()) between the "
            "images and the scorer."
        )
    return rewards


def _graph_reaches(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``target`` lies on ``output``'s autograd graph (a walk over ``grad_fn.next_functions``)."""
    goal = target.grad_fn
    if goal is None:  # a leaf: its AccumulateGrad node holds it as ``variable``
        def is_goal(node) -> bool:
            return getattr(node, "variable", None) is target
    else:
        def is_goal(node) -> bool:
            return node is goal
    start = output.grad_fn
    if start is None:
        return False
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if is_goal(node):
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False

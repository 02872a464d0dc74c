"""The reward the shapes-world alignment runs maximise, built on the learned scorer.

``score`` is the scorer's probability (with the objective's hinge), ``log_score`` its log; either can
subtract ``penalty x`` :func:`background_penalty`, a differentiable prior against the faint
background textures a hacked scorer rewards (the demo's default, penalty 5; see
``leapalign/assets/README.md`` for the runs behind it), and ``weight x`` :func:`colour_concentration`, a
prior against drawing every object of a prompt that names no colour in one colour (which the scorer and
the evaluator both accept).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from leapalign.shapes.world import BACKGROUND, COLORS, parse_prompt

__all__ = ["REWARDS", "LogScoreReward", "background_penalty", "colour_concentration", "PenalisedReward", "training_reward"]


class LogScoreReward:
    """``log p`` of the scorer (``logsigmoid`` of its logits): a ``RewardFn`` whose gradient does not
    vanish where the scorer's sigmoid saturates near 0, which is where most samples of a weak model sit."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(self.scorer.logits(images, prompts))


REWARDS = ("score", "log_score")


def _distance_to_background(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]``: each pixel's RGB distance to the background colour (with an epsilon so its gradient is finite)."""
    bg = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - bg).square().sum(1).add(1e-8).sqrt()


def background_penalty(images: torch.Tensor, tol: float = 0.3, softness: float = 0.03) -> torch.Tensor:
    """``[B]``, differentiable: mean over pixels of the RGB distance ``d`` to the background colour, weighted
    by ``sigmoid((tol - d) / softness)`` -- faint off-background pixels (the textures a hacked scorer
    rewards, which the evaluator reads as background) count fully, object colours (``d >= 0.55``) not at all."""
    d = _distance_to_background(images)
    return (d * torch.sigmoid((tol - d) / softness)).mean((1, 2))


def colour_concentration(images: torch.Tensor, prompts: Sequence[str], tol: float = 0.3, softness: float = 0.03,
                         temperature: float = 0.2) -> torch.Tensor:
    """Scalar, differentiable: how far the colours of the objects drawn for the batch's colourless prompts
    ("a circle", "two squares") are from being equally common: ``K * sum_c h_c**2 / mean_i sum_c s_ic**2 - 1``
    for the images' colour histograms ``s_i`` over the ``K`` palette colours and their mean ``h``. 0 when each
    image is drawn in palette colours and the colours are equally common across the images; ``K - 1`` when every
    image has the same colours -- one colour for all, or the same blend (off-palette, blurred objects do not
    lower it); 0 when fewer than two images come from such prompts.

    Each image's histogram is its object pixels' (RGB distance to the background beyond ``tol``, softly)
    soft nearest-palette-colour assignment (a softmax over distances at ``temperature``), normalised.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(f"images must be [B, 3, H, W] with one prompt per image, got {tuple(images.shape)} and {len(prompts)} prompts")
    free = [i for i, p in enumerate(prompts) if parse_prompt(p).names_no_colour]
    if len(free) < 2:
        return images.new_zeros(())
    x = images[free]
    palette = torch.tensor(list(COLORS.values()), dtype=x.dtype, device=x.device)  # [K, 3]
    on_object = torch.sigmoid((_distance_to_background(x) - tol) / softness)  # [N, H, W]
    dist = (x.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)).square().sum(2).add(1e-8).sqrt()  # [N, K, H, W]
    colour = torch.softmax(-dist / temperature, dim=1)
    per_image = (colour * on_object.unsqueeze(1)).sum((2, 3)) / on_object.sum((1, 2)).clamp_min(1e-6).unsqueeze(1)
    per_image = per_image / per_image.sum(1, keepdim=True).clamp_min(1e-6)
    between = per_image.mean(0).square().sum()  # <= within, by Jensen: equal when every image has the same colours
    within = per_image.square().sum(1).mean()  # 1 when each image is one palette colour, 1 / K when it is a blend
    return len(COLORS) * between / within - 1


class PenalisedReward:
    """``reward(images) - weight * background_penalty(images) - colour_weight * colour_concentration(images)``:
    the scorer with priors against background texture and against one colour for every colourless prompt."""

    def __init__(self, reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], weight: float, colour_weight: float = 0.0) -> None:
        self.reward, self.weight, self.colour_weight = reward, weight, colour_weight

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.reward(images, prompts)
        if self.weight:
            out = out - self.weight * background_penalty(images)
        if self.colour_weight:
            out = out - self.colour_weight * colour_concentration(images, prompts)
        return out


def training_reward(scorer: Any, name: str, penalty: float = 0.0, colour_weight: float = 0.0) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
    """The reward the objective maximises: the scorer itself (``score``) or :class:`LogScoreReward`, minus
    ``penalty`` times :func:`background_penalty` and ``colour_weight`` times :func:`colour_concentration`
    when either is > 0 (:class:`PenalisedReward`)."""
    if name == "score":
        reward = scorer
    elif name == "log_score":
        reward = LogScoreReward(scorer)
    else:
        raise ValueError(f"reward must be one of {REWARDS}, got {name!r}")
    return PenalisedReward(reward, penalty, colour_weight) if penalty > 0 or colour_weight > 0 else reward

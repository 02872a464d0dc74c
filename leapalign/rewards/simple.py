"""Analytic rewards with no model: smoke tests, demos and sanity checks of the whole pipeline."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["brightness_reward", "saturation_reward"]


def brightness_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Mean pixel value per image ``[B]``: the easiest differentiable reward there is."""
    return images.float().mean(dim=tuple(range(1, images.ndim)))


def saturation_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Mean per-pixel channel spread (max - min over RGB) ``[B]``: rewards colourful images."""
    x = images.float()
    return (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))

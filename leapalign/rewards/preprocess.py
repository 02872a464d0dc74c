"""Differentiable image preprocessing for CLIP-family rewards: resize, centre-crop, normalise in torch.

PIL or numpy round-trips cut the gradient (``call_reward`` raises on it); these ops keep the graph.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_preprocess"]

#: OpenAI CLIP's normalisation (also open_clip's OPENAI_DATASET_MEAN/STD, used by HPSv2 and PickScore).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]`` normalised, differentiable.

    Mirrors ``CLIPImageProcessor``: bicubic resize of the shortest side to ``size`` (antialiased
    when down-sampling), centre crop, ``(x - mean) / std``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=scale < 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.to(dtype) if dtype is not None else x

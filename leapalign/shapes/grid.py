"""Image grids for looking at samples: tensors in, a PNG out (no torchvision needed)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> one ``[3, rows*(H+pad)+pad, nrow*(W+pad)+pad]`` image, row-major."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    b, _, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i].detach().float().cpu().clamp(0, 1)
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 4) -> Path:
    """Write ``images`` as a PNG grid, each pixel upscaled ``scale`` x (nearest) so 32 px shapes are visible."""
    import matplotlib.image

    grid = image_grid(images, nrow)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), grid.permute(1, 2, 0).numpy())
    return path

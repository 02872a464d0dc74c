"""PNG grids of shapes-world samples: :func:`leapalign.sampling.image_grid`, padded and magnified.

The world's images are 32 px: each is framed by ``pad`` white pixels and the grid is upscaled
``scale`` x (nearest) so the shapes are visible; no torchvision needed.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from leapalign.sampling import image_grid

__all__ = ["save_image_grid"]


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 4, pad: int = 2) -> Path:
    """Write ``[B, 3, H, W]`` images in [0, 1] as one PNG, ``nrow`` per row, ``pad`` white pixels between and around them."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    import matplotlib.image

    tiles = images.detach().float().cpu().clamp(0, 1)
    blank = -len(tiles) % nrow  # empty cells of the last row stay white
    tiles = torch.cat([tiles, tiles.new_ones(blank, *tiles.shape[1:])])
    # Each tile carries the padding above and left of it; the grid gets the last column's and row's.
    grid = F.pad(image_grid(F.pad(tiles, (pad, 0, pad, 0), value=1.0), nrow), (0, pad, 0, pad), value=1.0)
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), grid.permute(1, 2, 0).numpy())
    return path

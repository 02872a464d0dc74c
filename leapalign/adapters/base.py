"""The one protocol every model adapter satisfies: a velocity field in packed latent space.

Kept small on purpose (TRL's lesson): any flow-matching transformer fits if it can draw noise,
predict a velocity, give its sigma schedule and decode latents to images.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class VelocityModel(Protocol):
    """``v(x, sigma | cond)`` over packed latents ``x: [B, N, C]``.

    - ``noise(batch_size, generator)`` -> ``[B, N, C]`` standard normal, in the model's dtype/device.
    - ``velocity(x, sigma, cond)`` -> ``[B, N, C]``; ``sigma`` is a scalar or ``[B]`` tensor in [0, 1].
    - ``sigmas(num_steps)`` -> ``[T + 1]`` float64 schedule from 1 to 0 (Flux: dynamic shift from N).
    - ``decode(latents)`` -> images ``[B, 3, H, W]`` in [0, 1], differentiable (identity-like for
      pixel-space models).
    - ``trainable_parameters()`` -> what the optimiser updates (LoRA or full weights).
    ``cond`` is adapter-specific (prompt embeddings...); objectives pass it through untouched.
    """

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

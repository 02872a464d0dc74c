"""Rectified-flow maths shared by every objective, adapter and benchmark.

Conventions (as Flux and diffusers use them): ``x_t = (1 - t) x0 + t eps``; t = 1 is noise, t = 0
the image; the velocity target is ``eps - x0``. Time is the scheduler's *sigma* (already shifted).
Sigma schedules are computed here, in float64 then cast, never through the stateful
``FlowMatchEulerDiscreteScheduler.step``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "uniform_sigmas",
    "shift_sigmas",
    "flux_mu",
    "flux_sigmas",
    "euler_step",
    "leap",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "text_ids",
]


def uniform_sigmas(num_steps: int) -> torch.Tensor:
    """``linspace(1, 1/T, T)`` followed by a final 0: T + 1 values, float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential time shift ``e^mu / (e^mu + (1/sigma - 1))``; sigma = 0 stays 0."""
    sigmas = sigmas.to(torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas.clamp_min(1e-300) - 1.0))
    return torch.where(sigmas > 0, shifted, torch.zeros_like(sigmas))


def flux_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's dynamic shift, linear in the packed image sequence length."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def flux_sigmas(num_steps: int, seq_len: int, dynamic_shift: bool = True, mu: float | None = None) -> torch.Tensor:
    """The training-rollout schedule of DESIGN §2: uniform, Flux-shifted, final 0 (T + 1 values, float64)."""
    sigmas = uniform_sigmas(num_steps)
    if mu is None:
        if not dynamic_shift:
            return sigmas
        mu = flux_mu(seq_len)
    return shift_sigmas(sigmas, mu)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float) -> torch.Tensor:
    """``x + (sigma_to - sigma_from) * v``; sigmas may be scalars or per-sample ``[B]``."""
    return x + _per_sample(sigma_to - sigma_from, x) * v


def leap(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float) -> torch.Tensor:
    """A leap is an Euler step that skips many steps; the same formula, named for readability."""
    return euler_step(x, v, sigma_from, sigma_to)


def _per_sample(c: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(c, torch.Tensor) and c.ndim == 1:
        return c.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    if isinstance(c, torch.Tensor):
        return c.to(like.dtype)
    return c


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``, exactly as ``FluxPipeline._pack_latents``."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are the *latent* sizes (even)."""
    if packed.ndim != 3:
        raise ValueError(f"packed latents must be [B, N, C], got shape {tuple(packed.shape)}")
    b, n, c = packed.shape
    if n != (height // 2) * (width // 2) or c % 4:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[(H/2)(W/2), 3]`` position ids for packed latents (H, W latent sizes), as ``FluxPipeline``."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's all-zero text position ids ``[L, 3]``."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)

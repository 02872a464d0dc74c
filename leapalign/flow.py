"""Rectified-flow maths shared by every objective, adapter and benchmark.

Conventions (as Flux and diffusers use them): ``x_t = (1 - t) x0 + t eps``; t = 1 is noise, t = 0
the image; the velocity target is ``eps - x0``. Time is the scheduler's *sigma* (already shifted).
Sigma schedules are computed here, in float64 then cast, never through the stateful
``FlowMatchEulerDiscreteScheduler.step``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import torch
import torch.utils.checkpoint

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
    "Rollout",
    "StepTap",
    "rollout",
    "differentiable_rollout",
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
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15,
    *, pipeline_rounding: bool = False,
) -> float:
    """Flux's dynamic shift, linear in the packed image sequence length.

    ``pipeline_rounding=True`` evaluates the same line in the order of diffusers' ``calculate_shift``
    (``len * m + (base - m * base_len)``), which the bit-exact FLUX.2/SD3 schedules need; the
    default order is FLUX.1's float64 training schedule (they differ in the last bits only).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    if pipeline_rounding:
        return seq_len * slope + (base_shift - slope * base_seq_len)
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
    return x + per_sample(sigma_to - sigma_from, x) * v


def leap(x: torch.Tensor, v: torch.Tensor, sigma_from: torch.Tensor | float, sigma_to: torch.Tensor | float) -> torch.Tensor:
    """A leap is an Euler step that skips many steps; the same formula, named for readability."""
    return euler_step(x, v, sigma_from, sigma_to)


def per_sample(c: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Broadcast a scalar or ``[B]`` coefficient against ``like: [B, ...]`` in ``like``'s dtype."""
    if isinstance(c, torch.Tensor):
        if c.ndim == 0:
            return c.to(like.dtype)
        if c.shape != (like.shape[0],):
            raise ValueError(f"coefficient must be a scalar or [{like.shape[0]}], got shape {tuple(c.shape)}")
        return c.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return float(c)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``, exactly as ``FluxPipeline._pack_latents``."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are the *latent* sizes (even)."""
    if packed.ndim != 3:
        raise ValueError(f"packed latents must be [B, N, C], got shape {tuple(packed.shape)}")
    b, n, c = packed.shape
    if n != (height // 2) * (width // 2) or c % 4:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit a {height}x{width} latent")
    x = packed.reshape(b, height // 2, width // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
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


# -- rollouts --------------------------------------------------------------------------------------

StepTap = Callable[[int, torch.Tensor], torch.Tensor]
"""``tap(i, x_i) -> v_i``: runs with autograd ON at a chosen step and returns the velocity the
rollout continues with (detached by the rollout). The tap may keep graph references (leaps)."""


@dataclass
class Rollout:
    """Result of an Euler rollout: final latents (detached) and, if recorded, every state.

    ``trajectory[i]`` is ``x_i``, the state *before* step ``i`` (``trajectory[0]`` is the noise,
    ``trajectory[-1]`` is ``x0``), so ``trajectory[i]`` sits at ``sigmas[i]``.
    """

    x0: torch.Tensor
    trajectory: list[torch.Tensor] | None = None


def _check_steps(sigmas: torch.Tensor, start: int, stop: int | None) -> int:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of T + 1 >= 2 values, got shape {tuple(sigmas.shape)}")
    num_steps = sigmas.numel() - 1
    stop = num_steps if stop is None else stop
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"need 0 <= start <= stop <= T={num_steps}, got start={start}, stop={stop}")
    return stop


def rollout(
    model: Any, cond: Any, x: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0, stop: int | None = None,
    taps: Mapping[int, StepTap] | None = None, record: bool = False,
) -> Rollout:
    """Euler-integrate ``model`` from step ``start`` to ``stop`` without autograd, except at ``taps``.

    Every step ``i`` computes ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i``. At a step in ``taps``
    the velocity comes from ``taps[i](i, x_i)`` run under ``torch.enable_grad()`` -- the rollout's
    own forward, reused by the objective for its gradient path -- and the rollout continues with its
    detached value; so with or without taps the latents are the same no-grad trajectory (as long as
    the tap evaluates the model at a tensor whose value is ``x_i``). Nothing else is kept alive.
    """
    stop = _check_steps(sigmas, start, stop)
    taps = taps or {}
    bad = [i for i in taps if not start <= i < stop]
    if bad:
        raise ValueError(f"tap steps {bad} are outside the rolled-out steps [{start}, {stop})")
    x = x.detach()
    trajectory = [x] if record else None
    for i in range(start, stop):
        s, s_next = sigmas[i], sigmas[i + 1]
        if i in taps:
            with torch.enable_grad():
                v = taps[i](i, x)
            v = v.detach()
        else:
            with torch.no_grad():
                v = model.velocity(x, s, cond)
        with torch.no_grad():
            x = euler_step(x, v, s, s_next)
        if trajectory is not None:
            trajectory.append(x)
    return Rollout(x0=x, trajectory=trajectory)


def differentiable_rollout(
    model: Any, cond: Any, x: torch.Tensor, sigmas: torch.Tensor, *, start: int = 0, stop: int | None = None,
    train_steps: Collection[int] | None = None, detach_model_input: bool = False, checkpoint: bool = False,
) -> torch.Tensor:
    """Euler steps ``[start, stop)`` with autograd through the chain: the full-backprop family.

    - ``train_steps``: steps whose velocity carries a parameter gradient (default: all). Other steps
      run the model without autograd, but the chain ``x + c v`` stays differentiable in ``x``.
    - ``detach_model_input``: feed ``sg(x_i)`` to the model (DRTune's stop-gradient at the input):
      the gradient then reaches each ``v_i`` only through the Euler sums, never through ``dv/dx``.
    - ``checkpoint``: wrap each grad step in ``torch.utils.checkpoint`` (non-reentrant): keeps one
      step's inputs per step instead of its activations and recomputes the forward in backward.
    Returns the final latents (attached to the graph).
    """
    stop = _check_steps(sigmas, start, stop)
    trained = set(range(start, stop)) if train_steps is None else set(train_steps)

    def step(x_i: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        v = model.velocity(x_i.detach() if detach_model_input else x_i, s, cond)
        return euler_step(x_i, v, s, s_next)

    with torch.enable_grad():
        for i in range(start, stop):
            s, s_next = sigmas[i], sigmas[i + 1]
            if i not in trained:
                with torch.no_grad():
                    v = model.velocity(x.detach(), s, cond)
                x = euler_step(x, v, s, s_next)
            elif checkpoint:
                x = torch.utils.checkpoint.checkpoint(step, x, s, s_next, use_reentrant=False)
            else:
                x = step(x, s, s_next)
    return x

"""Sampling schedules exactly as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes them.

FLUX.2 and SD3 adapters promise a rollout equal to their pipeline's sampling *bit for bit*, so their
sigmas must be the scheduler's own float32 values, not a float64 recomputation of the same formula
(FLUX.1's adapter computes in float64 and agrees to ~1e-7). This module repeats the scheduler's
arithmetic in the scheduler's dtypes -- numpy float32 where it casts custom sigmas to float32, numpy
float64 where it spaces its own timesteps, torch float32 for its training table -- and returns the
float32 values widened to float64 (the :class:`~leapalign.adapters.base.VelocityModel` contract).
Widening is exact, so ``sigma_b - sigma_a`` rounded to the latents' dtype equals the scheduler's
float32 ``dt``, and a rollout in :mod:`leapalign.flow` takes the scheduler's exact steps without
ever calling its stateful ``step``.

Only the configuration subset the verified pipelines use is reproduced; anything else (Karras,
exponential or beta spacing, a terminal shift, inverted sigmas, stochastic sampling) is refused by
:meth:`FlowMatchSchedule.from_scheduler` with an error naming the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch

from leapalign.flow import flux_mu

__all__ = ["FlowMatchSchedule", "calculate_shift"]

_UNSUPPORTED_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
    "invert_sigmas",
    "stochastic_sampling",
)


def calculate_shift(image_seq_len: int, **line: float) -> float:
    """diffusers' ``calculate_shift`` (SD3/FLUX.1 pipelines): :func:`leapalign.flow.flux_mu`'s line
    in the pipeline's own order of operations, which the bit-exact schedules need. ``line``:
    ``base_seq_len``, ``max_seq_len``, ``base_shift``, ``max_shift`` (FLUX.1's defaults)."""
    return flux_mu(image_seq_len, **line, pipeline_rounding=True)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The part of a ``FlowMatchEulerDiscreteScheduler`` config that decides a sampling schedule.

    ``shift`` is the static shift (used when ``use_dynamic_shifting`` is off); with dynamic
    shifting the caller passes ``mu`` (FLUX.2: the empirical mu; SD3: :func:`calculate_shift`).
    ``base_seq_len`` .. ``max_shift`` are the line :meth:`dynamic_mu` derives ``mu`` from. Each
    field is the scheduler config entry of its name (or of its ``metadata["key"]``), same default.
    """

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    num_train_timesteps: int = 1000
    base_seq_len: int = field(default=256, metadata={"key": "base_image_seq_len"})
    max_seq_len: int = field(default=4096, metadata={"key": "max_image_seq_len"})
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "FlowMatchSchedule":
        """Read a diffusers ``FlowMatchEulerDiscreteScheduler``; refuse any other class or option."""
        name = type(scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"scheduler is a {name}; the FLUX.2 and SD3 adapters reproduce FlowMatchEulerDiscreteScheduler "
                "schedules only"
            )
        cfg = scheduler.config
        used = [opt for opt in _UNSUPPORTED_OPTIONS if cfg.get(opt, None)]
        if used:
            raise ValueError(
                f"FlowMatchEulerDiscreteScheduler with {', '.join(f'{o}={cfg.get(o)!r}' for o in used)} is not "
                "supported; the adapters reproduce the plain (static or dynamically shifted) Euler schedule only"
            )
        values = {}
        for f in fields(cls):  # each value in its default's type (config files may hold ints for floats)
            values[f.name] = type(f.default)(cfg.get(f.metadata.get("key", f.name), f.default))
        values["shift"] = float(getattr(scheduler, "shift", values["shift"]))  # set_shift() changes .shift only
        return cls(**values)

    def sigmas(self, num_steps: int, base: Sequence[float] | np.ndarray | None = None, mu: float | None = None) -> torch.Tensor:
        """``[T + 1]`` float64 sigmas (float32 values, final 0) as ``set_timesteps(T, sigmas=base, mu=mu)``.

        ``base=None`` is the scheduler's own spacing, ``linspace(sigma_max, sigma_min)`` of its
        (shifted) training table, as a pipeline that passes no ``sigmas`` gets (SD3). With a ``base``
        (FLUX.2 passes ``linspace(1, 1/T, T)``) the values are cast to float32 first, as the scheduler does.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be given for a dynamically shifted schedule (use_dynamic_shifting=True)")
        n = self.num_train_timesteps
        if base is None:
            sigma_max, sigma_min = self._training_range()
            sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
        else:
            sigmas = np.array(base).astype(np.float32)
            if sigmas.shape != (num_steps,):
                raise ValueError(f"base must hold num_steps={num_steps} sigmas, got shape {sigmas.shape}")
        if self.use_dynamic_shifting:
            if self.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        out = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32)
        return torch.cat([out, torch.zeros(1)]).to(torch.float64)

    def _training_range(self) -> tuple[float, float]:
        """``(sigma_max, sigma_min)`` of the scheduler's training table, computed as its ``__init__`` does."""
        n = self.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()).to(dtype=torch.float32)
        sigmas = timesteps / n
        if not self.use_dynamic_shifting:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas[0].item(), sigmas[-1].item()

    def dynamic_mu(self, image_seq_len: int) -> float:
        """``mu`` from the config's shift line, as the SD3 pipeline computes it (:func:`calculate_shift`)."""
        return calculate_shift(
            image_seq_len, base_seq_len=self.base_seq_len, max_seq_len=self.max_seq_len,
            base_shift=self.base_shift, max_shift=self.max_shift,
        )

    @staticmethod
    def timesteps(sigma: torch.Tensor | float, num_train_timesteps: int = 1000) -> torch.Tensor:
        """The scheduler's ``timesteps = sigmas * num_train_timesteps`` (float32) for given sigma(s)."""
        return torch.as_tensor(sigma).to(torch.float32) * num_train_timesteps

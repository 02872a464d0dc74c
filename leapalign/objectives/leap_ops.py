"""LeapAlign's small tensor operations, in plain PyTorch, in one place.

These are the ops ``leapkernels`` fuses into kernels (DESIGN §3: "leap update and connectors"
and "per-term gradient magnitude scaling"). Objectives never call them directly: they ask
:func:`leap_ops` for a :class:`LeapOps` bundle — the fused ``leapkernels`` ops by default
(``use_kernels=True``), or the plain-PyTorch reference ops here, the truth tests compare against.

The connector is ``leapkernels``' own reference (`leapkernels.leap_connector_reference`, one
definition for both packages). Both value-preserving ops are written so the forward value is
**bit-identical** to the true latent (``x_true + (a - sg(a))`` is ``x_true + 0``), not
``a + sg(x_true - a)``, whose rounding would perturb the rollout the reward sees. Distances and
the trajectory weight are computed in the wider of float32 and the latents' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from leapalign.flow import per_sample
from leapkernels.ops.leap_connector import leap_connector_reference, mean_abs_distance

__all__ = [
    "LeapOps",
    "leap_ops",
    "leap_connector",
    "grad_scale",
    "mean_abs_distance",
    "trajectory_weight",
    "hinge_loss",
    "WEIGHTINGS",
]

WEIGHTINGS = ("both", "d_j", "d_0", "off")


def leap_connector(
    x_from: torch.Tensor, v: torch.Tensor, c: torch.Tensor | float, x_true: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leap ``xhat = x_from + c v`` joined to the true latent by a straight-through connector.

    Returns ``(connected, distance)``: ``connected`` has the value of ``x_true`` (bit for bit) and
    the gradient of ``xhat`` (to ``x_from``, ``v`` and a tensor ``c``); ``distance = mean |x_true - xhat|``
    per sample, no gradient, in the wider of float32 and the latents' dtype. ``c`` is
    ``sigma_to - sigma_from``, a scalar or ``[B]``.
    """
    if x_from.shape != v.shape or x_true.shape != v.shape:
        raise ValueError(
            f"leap_connector needs x_from, v and x_true of one shape, got {tuple(x_from.shape)}, "
            f"{tuple(v.shape)}, {tuple(x_true.shape)}"
        )
    per_sample(c, v)  # checks c is a scalar or one value per sample
    return leap_connector_reference(x_from, v, c, x_true)


def grad_scale(x: torch.Tensor, alpha: float | torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Identity forward (bit for bit), gradient times ``alpha`` (scalar or ``[B]``): LeapAlign's discount.

    Equals ``alpha x + (1 - alpha) sg(x)`` in value and gradient, without its rounding. With
    ``max_norm`` each sample's scaled gradient is also capped at that L2 norm (soft alternative to
    dropping the term); that needs a backward hook, so the plain form above is kept when it is off.
    """
    if max_norm is None:
        return x.detach() + per_sample(alpha, x) * (x - x.detach())
    import leapkernels

    return leapkernels.grad_scale_reference(x, alpha, max_norm)


@dataclass(frozen=True)
class LeapOps:
    """The swappable implementations: reference PyTorch here, fused Triton in ``leapkernels``."""

    leap_connector: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    grad_scale: Callable[..., torch.Tensor]
    name: str = "reference"


REFERENCE_OPS = LeapOps(leap_connector=leap_connector, grad_scale=grad_scale, name="reference")


def leap_ops(use_kernels: bool = True) -> LeapOps:
    """Pick the leap/connector/discount implementation.

    ``use_kernels=True`` (the default) runs the fused ``leapkernels.leap_connector`` /
    ``leapkernels.grad_scale``; their backend follows ``leapkernels.backend`` (compiled Triton on
    CUDA, native or PyTorch reference on CPU, the interpreter under ``TRITON_INTERPRET=1``).
    ``False`` runs the plain-PyTorch ops above, the reference the tests compare against.
    """
    if not use_kernels:
        return REFERENCE_OPS
    import leapkernels

    return LeapOps(leap_connector=leapkernels.leap_connector, grad_scale=leapkernels.grad_scale, name="leapkernels")


def trajectory_weight(
    d_intermediate: list[torch.Tensor], d_0: torch.Tensor, tau: float, mode: str = "both"
) -> torch.Tensor:
    """LeapAlign's trajectory weight ``sg(1 / (sum_i max(d_i, tau) + max(d_0, tau)))`` per sample.

    ``d_intermediate`` holds the distances at the intermediate connectors (``[d_j]`` for two leaps,
    ``[]`` for one, two entries for three); ``mode`` keeps both kinds (``"both"``), only the
    intermediate ones (``"d_j"``), only the final one (``"d_0"``), or none (``"off"``: weight 1).
    Returned as ``[B]`` without gradient, in the wider of float32 and the distances' dtype.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if mode not in WEIGHTINGS:
        raise ValueError(f"weighting mode must be one of {WEIGHTINGS}, got {mode!r}")
    acc = torch.promote_types(d_0.dtype, torch.float32)
    for d in d_intermediate:
        acc = torch.promote_types(acc, d.dtype)
    d_0 = d_0.detach().to(acc)
    if mode == "off":
        return torch.ones_like(d_0)
    terms: list[torch.Tensor] = []
    if mode in ("both", "d_j"):
        if mode == "d_j" and not d_intermediate:
            raise ValueError("weighting='d_j' needs an intermediate connector (2 or 3 leaps), got 1 leap")
        terms += [d.detach().to(acc).clamp_min(tau) for d in d_intermediate]
    if mode in ("both", "d_0"):
        terms.append(d_0.clamp_min(tau))
    return 1.0 / torch.stack(terms).sum(dim=0)


def hinge_loss(rewards: torch.Tensor, hinge_lambda: float | None) -> torch.Tensor:
    """Per-sample ``relu(lambda - r)``; ``None`` gives plain reward maximisation ``-r``."""
    if hinge_lambda is None:
        return -rewards
    return torch.relu(hinge_lambda - rewards)

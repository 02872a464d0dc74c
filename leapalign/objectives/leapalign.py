"""The LeapAlign objective (Liang et al., CVPR 2026, arXiv 2604.15311), exactly as DESIGN §2.

One call per micro-batch:

1. draw leap steps ``i_k < i_j`` uniformly from ``[min_idx, max_idx)`` (one set per micro-batch);
2. roll the ODE out from fresh noise for T steps without autograd, except at the leap steps, where
   the rollout's own forward runs with autograd on (no extra forward);
3. at ``i_k``: ``xhat_j = x_k + (sigma_j - sigma_k) v(x_k)``; the rollout continues with ``sg(v_k)``;
4. at ``i_j``: ``d_j = mean |x_j - xhat_j|``; connector ``x_j' = xhat_j + sg(x_j - xhat_j)``;
   discount ``x_in = alpha x_j' + (1 - alpha) sg(x_j')``; ``v_j = v(x_in)``;
   ``xhat_0 = x_j' - sigma_j v_j``; the rollout continues with ``sg(v_j)``;
5. after the last step: ``d_0 = mean |x0 - xhat_0|``; connector ``x0' = xhat_0 + sg(x0 - xhat_0)``;
   decode and score ``x0'`` (the true image, the two-leap gradient) -- or ``xhat_0`` itself with
   ``reward_on="xhat0"``;
6. loss per sample ``relu(lambda - r) * sg(1 / (max(d_j, tau) + max(d_0, tau)))``, batch mean.

Its parameter gradient is ``-j dv_j - (k - j) dv_k + alpha j (k - j) J dv_k`` (sigmas written k, j;
``J = dv/dx`` at ``x_j``): alpha scales only the nested term; alpha = 0 is DRTune's stop-gradient at
the model input. One leap (``xhat_0 = x_k - k v_k``) and three leaps (``k -> j -> l -> 0``, the
discount applied at every intermediate model input, every intermediate distance in the weight) are
the paper's ablations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from leapalign.flow import leap, rollout
from leapalign.objectives.base import GradientWindow, ObjectiveOutput, RolloutObjective
from leapalign.objectives.leap_ops import WEIGHTINGS, leap_ops, trajectory_weight
from leapalign.objectives.scoring import sample_sorted_steps
from leapalign.rewards.base import RewardFn

__all__ = ["LeapAlignObjectiveConfig", "LeapAlignObjective"]

_STEP_NAMES = ("i_k", "i_j", "i_l")
_DISTANCE_NAMES = ("d_j", "d_l")


@dataclass
class LeapAlignObjectiveConfig:
    """LeapAlign's knobs; paper defaults (HPSv2.1). Validated on construction."""

    num_steps: int = field(default=25, metadata={"help": "T, Euler steps of the training rollout"})
    num_leaps: int = field(default=2, metadata={"help": "leaps in the surrogate path: 1, 2 (paper) or 3"})
    min_idx: int = field(default=0, metadata={"help": "leap steps are drawn from [min_idx, max_idx)"})
    max_idx: int | None = field(default=None, metadata={"help": "exclusive upper bound; None = num_steps"})
    alpha: float = field(default=0.3, metadata={"help": "gradient discount of the nested term, in [0, 1]"})
    tau: float = field(default=0.1, metadata={"help": "floor of the distances in the trajectory weight, > 0"})
    weighting: str = field(default="both", metadata={"help": "trajectory weight: both | d_j | d_0 | off"})
    hinge_lambda: float | None = field(default=0.55, metadata={"help": "loss relu(lambda - r); None = -r"})
    reward_on: str = field(default="x0", metadata={"help": "score the true x0 (connector) or xhat0 (leap)"})
    fixed_steps: tuple[int, ...] | None = field(
        default=None, metadata={"help": "fixed leap steps (tests, ablations) instead of sampling"}
    )
    use_kernels: bool = field(default=True, metadata={"help": "fused leapkernels ops for leap/connector/discount"})
    discount_max_norm: float | None = field(
        default=None,
        metadata={"help": "cap each sample's nested-term gradient norm at this bound (after alpha); None = off"},
    )

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_leaps not in (1, 2, 3):
            raise ValueError(f"num_leaps must be 1, 2 or 3, got {self.num_leaps}")
        max_idx = self.upper_idx
        if not 0 <= self.min_idx:
            raise ValueError(f"min_idx must be >= 0, got {self.min_idx}")
        if self.min_idx >= max_idx:
            raise ValueError(f"min_idx must be < max_idx, got min_idx={self.min_idx} >= max_idx={max_idx}")
        if max_idx > self.num_steps:
            raise ValueError(f"max_idx must be <= num_steps={self.num_steps}, got {max_idx}")
        if max_idx - self.min_idx < self.num_leaps:
            raise ValueError(
                f"{self.num_leaps} leaps need at least {self.num_leaps} distinct steps in [min_idx, max_idx) = "
                f"[{self.min_idx}, {max_idx}), which has {max_idx - self.min_idx}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.discount_max_norm is not None and not self.discount_max_norm > 0:
            raise ValueError(f"discount_max_norm must be > 0 or None, got {self.discount_max_norm}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.weighting == "d_j" and self.num_leaps == 1:
            raise ValueError("weighting='d_j' needs an intermediate connector; with num_leaps=1 use 'd_0' or 'off'")
        if self.reward_on not in ("x0", "xhat0"):
            raise ValueError(f"reward_on must be 'x0' or 'xhat0', got {self.reward_on!r}")
        if self.fixed_steps is not None:
            steps = tuple(int(i) for i in self.fixed_steps)
            if len(steps) != self.num_leaps:
                raise ValueError(f"fixed_steps must hold num_leaps={self.num_leaps} steps, got {steps}")
            if any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(f"fixed_steps must be strictly increasing, got {steps}")
            if steps[0] < self.min_idx or steps[-1] >= max_idx:
                raise ValueError(f"fixed_steps {steps} must lie in [min_idx, max_idx) = [{self.min_idx}, {max_idx})")
            self.fixed_steps = steps

    @property
    def upper_idx(self) -> int:
        """The exclusive upper bound of the leap steps: ``max_idx``, or ``num_steps`` when it is None."""
        return self.num_steps if self.max_idx is None else self.max_idx


class LeapAlignObjective(RolloutObjective):
    """LeapAlign behind the :class:`Objective` interface (see the module docstring for the maths).

    Its gradient window is the two (one, three) leaps built inside the rollout's own forwards at
    the drawn steps; the trajectory weight rides along to the shared scoring tail.
    """

    name = "leapalign"
    config_class = LeapAlignObjectiveConfig

    def __init__(self, config: LeapAlignObjectiveConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.ops = leap_ops(self.config.use_kernels)

    def sample_steps(self, generator: torch.Generator | None = None) -> list[int]:
        """The leap steps of one micro-batch: ``fixed_steps`` or a uniform draw from ``[min_idx, max_idx)``."""
        cfg = self.config
        if cfg.fixed_steps is not None:
            return list(cfg.fixed_steps)
        return sample_sorted_steps(cfg.min_idx, cfg.upper_idx, cfg.num_leaps, generator)

    def window(
        self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None
    ) -> GradientWindow:
        cfg, ops = self.config, self.ops
        steps = self.sample_steps(generator)

        # The leap path built inside the rollout's own forwards: x_from/v/sigma of the pending leap.
        pending: dict[str, Any] = {}
        intermediate: list[torch.Tensor] = []

        def tap(i: int, x: torch.Tensor) -> torch.Tensor:
            sigma = sigmas[i]
            if not pending:  # first leap: the model sees the rollout's x_k itself
                x_from, x_in = x, x
            else:  # arrive at x_i by the pending leap: connector, then the discounted model input
                x_from, d = ops.leap_connector(pending["x_from"], pending["v"], sigma - pending["sigma"], x)
                intermediate.append(d)
                x_in = ops.grad_scale(x_from, cfg.alpha, cfg.discount_max_norm)
            v = model.velocity(x_in, sigma, cond)
            pending.update(x_from=x_from, v=v, sigma=sigma)
            return v

        x0 = rollout(model, cond, noise, sigmas, taps={i: tap for i in steps}).x0
        with torch.enable_grad():
            latents, d_0 = ops.leap_connector(pending["x_from"], pending["v"], sigmas[-1] - pending["sigma"], x0)
            if cfg.reward_on == "xhat0":
                latents = leap(pending["x_from"], pending["v"], pending["sigma"], sigmas[-1])
        weight = trajectory_weight(intermediate, d_0, cfg.tau, cfg.weighting)
        metrics = {"weight_mean": float(weight.mean()), "d_0": float(d_0.mean())}
        metrics.update((name, float(d.mean())) for name, d in zip(_DISTANCE_NAMES, intermediate))
        metrics.update((name, float(i)) for name, i in zip(_STEP_NAMES, steps))
        return GradientWindow(latents, metrics, weight)

    def score(self, model: Any, window: GradientWindow, prompts: Sequence[str], reward: RewardFn) -> ObjectiveOutput:
        """The shared tail, plus the spread of the rewards and the share of samples under the hinge."""
        out = super().score(model, window, prompts, reward)
        rewards = out.rewards
        out.metrics["reward_std"] = float(rewards.std()) if rewards.shape[0] > 1 else 0.0
        if self.config.hinge_lambda is not None:
            out.metrics["hinge_active"] = float((rewards < self.config.hinge_lambda).float().mean())
        return out

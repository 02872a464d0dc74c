"""Baselines behind the same :class:`Objective` interface as LeapAlign (DESIGN §2), for studies and benchmarks.

Each is written in rectified-flow terms (``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i``, the
one-step image prediction from step i is ``x_i - sigma_i v_i``) on the shared skeleton
(:class:`~leapalign.objectives.base.RolloutObjective`): each baseline writes only its gradient
window, the steps whose forward carries a parameter gradient. All share the loss
``mean(relu(lambda - r))`` when ``hinge_lambda`` is set, else ``-mean(r)`` (plain reward
maximisation, the baselines' own papers), so a comparison can hold the loss fixed.

Noise is always drawn first from the generator, then any random step choice, so two objectives
called with equally seeded generators see the same initial noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from leapalign.flow import differentiable_rollout, leap, rollout
from leapalign.objectives.base import GradientWindow, ObjectiveOutput, RolloutObjective
from leapalign.objectives.scoring import sample_sorted_steps, start_rollout
from leapalign.rewards.base import RewardFn

__all__ = [
    "BaselineConfig",
    "FullBackpropConfig",
    "FullBackpropObjective",
    "DraftKConfig",
    "DraftKObjective",
    "DraftLVConfig",
    "DraftLVObjective",
    "ReFLConfig",
    "ReFLObjective",
    "DRTuneConfig",
    "DRTuneObjective",
    "AlignPropConfig",
    "AlignPropObjective",
]


@dataclass
class BaselineConfig:
    """Fields every baseline has."""

    num_steps: int = field(default=25, metadata={"help": "T, Euler steps of the rollout"})
    hinge_lambda: float | None = field(default=None, metadata={"help": "loss relu(lambda - r); None = -r"})

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    def check_k(self, k: int) -> None:
        """``k`` (a count of trained steps) must lie in ``[1, num_steps]``."""
        if not 1 <= k <= self.num_steps:
            raise ValueError(f"k must be in [1, num_steps={self.num_steps}], got {k}")


def _random_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in ``[low, high)`` from ``generator`` (on its device)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high, (1,), generator=generator, device=device))


# -- full-trajectory backprop -----------------------------------------------------------------------


@dataclass
class FullBackpropConfig(BaselineConfig):
    checkpoint: bool = field(default=False, metadata={"help": "torch.utils.checkpoint around every step"})


class FullBackpropObjective(RolloutObjective):
    """Naive backprop through all T Euler steps (the memory baseline; memory grows linearly in T).

    With ``checkpoint=True`` each step is recomputed in backward (per-step gradient checkpointing,
    the standard memory fix: one step's input kept per step, one extra forward per step).
    """

    name = "full_backprop"
    config_class = FullBackpropConfig

    def window(self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> GradientWindow:
        return GradientWindow(differentiable_rollout(model, cond, noise, sigmas, checkpoint=self.config.checkpoint))


# -- DRaFT ---------------------------------------------------------------------------------------------


@dataclass
class DraftKConfig(BaselineConfig):
    k: int = field(default=1, metadata={"help": "backprop through the last K steps"})
    checkpoint: bool = field(default=False, metadata={"help": "checkpoint each of the K steps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_k(self.k)


class DraftKObjective(RolloutObjective):
    """DRaFT-K (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
    ICLR 2024, arXiv 2309.17400): sample without gradient for T - K steps, then backprop through
    the last K steps only. DRaFT-1 is backprop through the final step alone."""

    name = "draft_k"
    config_class = DraftKConfig

    def draw_k(self, generator: torch.Generator | None) -> int:
        """How many final steps to backprop through: the configured K."""
        return self.config.k

    def window(self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> GradientWindow:
        k, num_steps = self.draw_k(generator), self.config.num_steps
        last_k = range(num_steps - k, num_steps)  # the steps before run without autograd
        x0 = differentiable_rollout(model, cond, noise, sigmas, train_steps=last_k, checkpoint=self.config.checkpoint)
        return GradientWindow(x0, {"k": float(k)})


@dataclass
class DraftLVConfig(BaselineConfig):
    n: int = field(default=2, metadata={"help": "re-noised copies of the final image per sample"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


class DraftLVObjective(RolloutObjective):
    """DRaFT-LV (Clark et al., ICLR 2024, arXiv 2309.17400, §4): a lower-variance DRaFT-1.

    Sample ``x0`` without gradient; then ``n`` times re-noise it to the last step's level
    ``s = sigma_{T-1}`` with fresh noise, ``x_s = (1 - s) sg(x0) + s eps``, denoise in one step
    with gradient, ``x0hat = x_s - s v(x_s)``, and score ``x0hat``; the loss averages the n copies.
    The reported rewards/images are those of the first copy. It is the one baseline with n windows
    per rollout, so it runs the skeleton's steps itself.
    """

    name = "draft_lv"
    config_class = DraftLVConfig

    def __call__(self, model: Any, cond: Any, prompts: Sequence[str], reward: RewardFn,
                 generator: torch.Generator | None = None) -> ObjectiveOutput:
        batch, sigmas, noise = start_rollout(model, cond, prompts, self.config.num_steps, generator)
        x0 = rollout(model, cond, noise, sigmas).x0
        outs = [self.score(model, self.window(model, cond, x0, sigmas, generator), prompts, reward)
                for _ in range(self.config.n)]
        loss = torch.stack([out.loss for out in outs]).mean()
        metrics = {**outs[0].metrics, "loss": float(loss.detach()), "n": float(self.config.n)}
        return ObjectiveOutput(loss=loss, rewards=outs[0].rewards, images=outs[0].images, metrics=metrics)

    def window(self, model: Any, cond: Any, x0: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> GradientWindow:
        """One re-noised copy of the final image ``x0``, denoised in one step with gradient."""
        s = sigmas[-2]
        eps = model.noise(x0.shape[0], generator)
        with torch.no_grad():
            x_s = (1 - s).to(x0.dtype) * x0 + s.to(x0.dtype) * eps
        with torch.enable_grad():
            return GradientWindow(leap(x_s, model.velocity(x_s, s, cond), s, sigmas[-1]))


# -- ReFL ----------------------------------------------------------------------------------------------


@dataclass
class ReFLConfig(BaselineConfig):
    min_idx: int | None = field(default=None, metadata={"help": "first candidate step; None = T - max(1, T // 4)"})
    max_idx: int | None = field(default=None, metadata={"help": "exclusive end of the candidates; None = T"})

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.lower_idx, self.upper_idx
        if not 0 <= low < high <= self.num_steps:
            raise ValueError(
                f"need 0 <= min_idx < max_idx <= num_steps={self.num_steps}, got min_idx={low}, max_idx={high}"
            )

    @property
    def upper_idx(self) -> int:
        """``max_idx``, or ``num_steps`` when None."""
        return self.num_steps if self.max_idx is None else self.max_idx

    @property
    def lower_idx(self) -> int:
        """``min_idx``, or the start of the last quarter of ``[0, upper_idx)`` when None."""
        if self.min_idx is not None:
            return self.min_idx
        return max(0, self.upper_idx - max(1, self.num_steps // 4))


class ReFLObjective(RolloutObjective):
    """ReFL (Xu et al., "ImageReward", NeurIPS 2023, arXiv 2304.05977): sample without gradient to a
    random late step t (ImageReward: t in [30, 40) of 40; here ``[min_idx, max_idx)``, default the
    last quarter), then predict the image in one step with gradient, ``x0hat = x_t - sigma_t v(x_t)``,
    and score that prediction."""

    name = "refl"
    config_class = ReFLConfig

    def window(self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> GradientWindow:
        (t,) = sample_sorted_steps(self.config.lower_idx, self.config.upper_idx, 1, generator)
        x_t = rollout(model, cond, noise, sigmas, stop=t).x0
        with torch.enable_grad():
            x0_hat = leap(x_t, model.velocity(x_t, sigmas[t], cond), sigmas[t], sigmas[-1])
        return GradientWindow(x0_hat, {"t": float(t)})


# -- DRTune --------------------------------------------------------------------------------------------


@dataclass
class DRTuneConfig(BaselineConfig):
    k: int = field(default=2, metadata={"help": "number of trained steps"})
    fixed_steps: tuple[int, ...] | None = field(default=None, metadata={"help": "trained steps instead of sampling"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_k(self.k)
        if self.fixed_steps is not None:
            steps = tuple(sorted(int(i) for i in self.fixed_steps))
            if len(set(steps)) != self.k or steps[0] < 0 or steps[-1] >= self.num_steps:
                raise ValueError(
                    f"fixed_steps must be k={self.k} distinct steps in [0, {self.num_steps}), got {self.fixed_steps}"
                )
            self.fixed_steps = steps


class DRTuneObjective(RolloutObjective):
    """DRTune (Wu et al., "Deep Reward Supervisions for Tuning Text-to-Image Diffusion Models",
    ECCV 2024, arXiv 2405.00760): backprop through the whole sampling chain but stop the gradient
    at the denoiser's input (``v(sg(x_i))``), and train only K of the T steps, evenly spaced with a
    random offset. The gradient is ``sum_{i trained} (sigma_{i+1} - sigma_i) dv_i/dtheta`` and its
    memory holds K forwards. The chain always runs to the last step (no early stop before x0)."""

    name = "drtune"
    config_class = DRTuneConfig

    def train_steps(self, generator: torch.Generator | None) -> list[int]:
        cfg = self.config
        if cfg.fixed_steps is not None:
            return list(cfg.fixed_steps)
        stride = cfg.num_steps // cfg.k
        offset = _random_int(0, stride, generator)
        return [offset + m * stride for m in range(cfg.k)]

    def window(self, model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor, generator: Any) -> GradientWindow:
        steps = self.train_steps(generator)
        x0 = differentiable_rollout(model, cond, noise, sigmas, train_steps=steps, detach_model_input=True)
        return GradientWindow(x0, {f"step_{n}": float(i) for n, i in enumerate(steps)})


# -- AlignProp -----------------------------------------------------------------------------------------


@dataclass
class AlignPropConfig(BaselineConfig):
    min_k: int = field(default=1, metadata={"help": "smallest truncation length"})
    max_k: int | None = field(default=None, metadata={"help": "largest truncation length; None = T"})
    checkpoint: bool = field(default=True, metadata={"help": "checkpoint each step (AlignProp does)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_k is None:
            self.max_k = self.num_steps
        if not 1 <= self.min_k <= self.max_k <= self.num_steps:
            raise ValueError(
                f"need 1 <= min_k <= max_k <= num_steps={self.num_steps}, got min_k={self.min_k}, max_k={self.max_k}"
            )


class AlignPropObjective(DraftKObjective):
    """AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward
    Backpropagation", arXiv 2310.03739): randomized truncated backprop -- each call draws
    ``K ~ U{min_k, ..., max_k}`` and backprops through the last K steps (DRaFT-K with a random K),
    with per-step gradient checkpointing."""

    name = "alignprop"
    config_class = AlignPropConfig

    def draw_k(self, generator: torch.Generator | None) -> int:
        return _random_int(self.config.min_k, self.config.max_k + 1, generator)

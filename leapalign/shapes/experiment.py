"""The shapes-world alignment experiment as a library: settings, training, evaluation, measurement.

``leapalign demo`` (:mod:`leapalign.shapes.demo`) is its command line; ``python -m
leapalign.shapes.harden`` and ``python -m benchmarks study`` run it with their own settings. One run:

1. :func:`evaluate_alignment` samples a fixed evaluation set (:func:`leapalign.shapes.world.eval_prompts`,
   fixed noise) and reports the **rule-based accuracy** per GenEval-like category (the exact evaluator,
   which never trains) and the **reward** (the learned scorer, which is what LeapAlign maximises); it also
   measures the **background artifacts** (:func:`leapalign.shapes.evaluator.background_artifact_share`) the
   scorer may reward without the evaluator noticing; the same on the **held-out split**
   (:func:`leapalign.shapes.split.heldout_eval_prompts`), prompts no alignment run trains on;
2. :func:`make_trainer` builds a :class:`leapalign.LeapAlignTrainer` on the world's training prompts
   of ``train_categories`` (:func:`training_prompts` over :func:`leapalign.shapes.split.training_specs`: the
   held-out split removed; the eval sets cover every category) and :func:`train_and_track`
   steps it for exactly ``train_steps`` steps, evaluating every ``eval_every`` steps. No clock decides what is
   reported: a run is a pure function of its settings and seed (see "Determinism" below); ``time_limit_seconds``
   only aborts a run (:class:`TimeLimitExceeded`), it never truncates one;
3. :func:`measure_memory_time` compares bytes saved for backward, peak RSS and seconds per iteration
   of LeapAlign and naive full backprop at the same T; :func:`reading` says what the numbers mean.

Tuned choices (see :class:`DemoSettings`; the runs behind them are in ``leapalign/assets/README.md``):
full fine-tune (the model has 1.9M parameters), AdamW lr 1e-4, 240 steps of batch 16,
T = 12 for rollout and evaluation, training prompts of the two categories the scorer judges best (single objects
and colours: +14.1 mean against +8.4 on the whole grammar), 3 leaps (+0.8 over 2, within the noise), alpha 0.3, leap
steps from all 12 rollout steps (the first 8, ``max_leap_step`` 8, was no better: ``benchmarks/results/demo_shapes/README.md``),
and the training reward the scorer's probability with the hinge ``relu(0.95 - r)``. Maximising ``log p`` instead weights each
sample by ``1 / p`` and so pushes hardest on the worst images, where the scorer is least reliable: with it the
rule-based accuracy collapsed (24 % -> 7 % in 120 steps). The reward also subtracts 5 x :func:`background_penalty`
(faint off-background pixels): with the bare scorer, 240 steps covered 21-24 % of the background with a texture the evaluator cannot see (0.1 % with the penalty, at an equal or better accuracy;
``leapalign/assets/README.md``), and 0.2 x :func:`leapalign.shapes.reward.colour_concentration`: without it one colour
took up to 68 % of the objects of prompts that name none (sixth pass of the demo results README).

The learned scorer is a proxy, like HPS or PickScore: if the reward rises while the rule-based
accuracy does not, the scorer is being hacked, and :func:`reading` says so.

Determinism: the trainer draws every step's noise, leap pair and prompts from generators seeded by
``(seed, step)``, the evaluation from ``eval_seed``; the model is float32 on CPU. Two runs with the
same settings, seed and torch thread count give bit-identical numbers (tested). The thread count
is recorded with the results because parallel CPU reductions may in principle order their sums
differently with it; on the project's 2-core machine 1 and 2 threads gave identical numbers. The
rollout is always eager: a compiled one rounds differently, and rounding alone moved single seeds'
gains by up to 7 points after 240 steps (the outcome of a run is chaotic in its arithmetic).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from leapalign.shapes.evaluator import COLOUR_SHARES_KEY, accuracy_by_category, background_artifact_share, evaluate, free_colour_shares
from leapalign.shapes.model import ShapesVelocityModel
from leapalign.shapes.reward import REWARDS, LogScoreReward, PenalisedReward, background_penalty, training_reward
from leapalign.shapes.split import heldout_eval_prompts, train_categories_arg, training_prompts
from leapalign.shapes.world import CATEGORIES, PromptSpec, eval_prompts

__all__ = [
    "DemoSettings",
    "LR_SCHEDULES",
    "quick_settings",
    "REWARDS",
    "LogScoreReward",
    "train_categories_arg",
    "training_prompts",
    "training_reward",
    "background_penalty",
    "PenalisedReward",
    "EvalResult",
    "evaluate_alignment",
    "eval_sets",
    "gain_summary",
    "TimeLimitExceeded",
    "objective_kwargs",
    "make_trainer",
    "TrainLog",
    "train_and_track",
    "measure_memory_time",
    "reading",
    "seeds_reading",
    "TARGET_MEAN_POINTS",
    "TARGET_MIN_POINTS",
]


LR_SCHEDULES = ("constant", "linear", "cosine")  # diffusers get_scheduler names that need no warm-up or other argument


@dataclass
class DemoSettings:
    """The knobs of one alignment run on the shapes world (defaults: the tuned demo)."""

    train_steps: int = 240
    time_limit_seconds: float = 0.0  # > 0: abort (TimeLimitExceeded) when training takes longer; never truncates a run
    num_steps: int = 12  # T of the training rollout (and of the evaluation sampler)
    batch_size: int = 16
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # a diffusers.optimization.get_scheduler name over train_steps ("linear", "cosine", ...)
    train_mode: str = "full"
    lora_rank: int = 16
    alpha: float = 0.3
    hinge_lambda: float = 0.95
    num_leaps: int = 3  # with the training categories below, no colour prior: +14.99 mean over seeds 0-2 against +14.1 with 2
    max_leap_step: int | None = None  # LeapAlign draws its leap steps from the first N of the T (all when None or N >= T)
    ema_decay: float = 0.0  # off: a 0.97 EMA did not steady the accuracy curve in a 240-step run
    max_grad_norm: float = 1.0
    eval_prompts: int = 576  # 96 per category; its first 192 are eval_prompts(192) (same noise): 192 alone read ~4 points high (+12.7 vs +8.4)
    heldout_prompts: int = 96  # held-out split, evaluated before and after (0: skip)
    eval_every: int = 60
    eval_seed: int = 1234
    heldout_seed: int = 4321
    seed: int = 0
    reward: str = "score"  # what training maximises: "score" (scorer probability) or "log_score" (its log)
    background_penalty: float = 5.0  # minus this times background_penalty(images) in the training reward (0: the bare scorer)
    colour_diversity: float = 0.2  # minus this times colour_concentration(images, prompts) in the reward: +15.7 mean, one colour <= 34 %
    # Training prompts only from these categories (None: the whole grammar); the eval sets always cover all six. The two the
    # scorer judges best: +14.1 mean over seeds 0-2 against +8.4 on the whole grammar (demo_shapes/README.md, fourth pass).
    train_categories: tuple[str, ...] | None = ("single_object", "colors")

    def __post_init__(self) -> None:
        if isinstance(self.train_categories, str):  # one category by name, not its letters
            self.train_categories = (self.train_categories,)
        if self.train_categories is not None:  # a list from JSON or the command line: one canonical, hashable form
            self.train_categories = tuple(dict.fromkeys(self.train_categories))
        checks = {
            "train_steps": self.train_steps >= 1,
            "time_limit_seconds": self.time_limit_seconds >= 0,
            "num_steps": self.num_steps >= 2,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "lr_schedule": self.lr_schedule in LR_SCHEDULES,
            "train_mode": self.train_mode in ("full", "lora"),
            "eval_prompts": self.eval_prompts >= 1,
            "heldout_prompts": self.heldout_prompts >= 0,
            "eval_every": self.eval_every >= 1,
            "num_leaps": self.num_leaps in (1, 2, 3),
            "max_leap_step": self.max_leap_step is None or self.max_leap_step >= self.num_leaps,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "reward": self.reward in REWARDS,
            "background_penalty": self.background_penalty >= 0,
            "colour_diversity": self.colour_diversity >= 0,
            "train_categories": self.train_categories is None or (bool(self.train_categories) and set(self.train_categories) <= set(CATEGORIES)),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DemoSettings.{name}={getattr(self, name)!r} is invalid")


def quick_settings() -> DemoSettings:
    """The ``--quick`` budget: a few steps, few prompts, tiny T; every output is still written."""
    return DemoSettings(train_steps=2, num_steps=3, batch_size=2, eval_prompts=6, heldout_prompts=6, eval_every=1000)

@dataclass
class EvalResult:
    """Rule-based accuracy per category (+ overall), mean scorer reward and mean background-artifact
    share (:func:`~leapalign.shapes.evaluator.background_artifact_share`) on a fixed eval set."""

    accuracy: dict[str, float]
    reward: float
    reward_by_category: dict[str, float]
    images: torch.Tensor = field(repr=False)
    artifact_share: float = 0.0
    correct: list[bool] = field(default_factory=list, repr=False)  # the evaluator's verdict per prompt, in order
    rewards: list[float] = field(default_factory=list, repr=False)  # the scorer's reward per prompt, in order
    colour_shares: dict[str, float] = field(default_factory=dict)  # :func:`free_colour_shares`: colours where any passes

    def to_json(self) -> dict[str, Any]:
        """Everything but the images; ``correct`` as a string of 0/1 per prompt (for paired comparisons and subsets)."""
        return {"accuracy": self.accuracy, "reward": self.reward, "reward_by_category": self.reward_by_category,
                "background_artifact_share": self.artifact_share, COLOUR_SHARES_KEY: self.colour_shares,
                "correct": "".join("1" if c else "0" for c in self.correct)}


@torch.no_grad()
def evaluate_alignment(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    specs: Sequence[PromptSpec],
    num_steps: int,
    seed: int,
    batch_size: int = 48,
) -> EvalResult:
    """Sample ``specs`` from fixed noise (``seed``) and judge them with the exact evaluator and the scorer.

    The noise depends only on ``seed``, ``len(specs)`` and ``batch_size``, so before/after runs see
    the same starting points.
    """
    was_training = model.training
    model.eval()
    prompts = [s.text for s in specs]
    g = torch.Generator().manual_seed(seed)
    images = torch.cat([model.sample(prompts[i : i + batch_size], num_steps, g).cpu() for i in range(0, len(prompts), batch_size)])
    rewards = torch.cat([scorer(images[i : i + batch_size], prompts[i : i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)])
    model.train(was_training)
    judgements = evaluate(images, list(specs))
    by_cat: dict[str, list[float]] = {}
    for spec, r in zip(specs, rewards.tolist()):
        by_cat.setdefault(spec.category, []).append(r)
    reward_by_category = {c: statistics.fmean(by_cat[c]) for c in CATEGORIES if c in by_cat}
    artifacts = float(background_artifact_share(images).mean())
    return EvalResult(accuracy_by_category(judgements), float(rewards.mean()), reward_by_category, images, artifacts,
                      [j.correct for j in judgements], rewards.tolist(), free_colour_shares(judgements))


def eval_sets(settings: DemoSettings) -> dict[str, list[PromptSpec]]:
    """The fixed evaluation sets of a run: ``eval`` (whole grammar) and ``heldout`` (held-out split; absent at 0)."""
    sets = {"eval": eval_prompts(settings.eval_prompts, settings.eval_seed)}
    if settings.heldout_prompts:
        sets["heldout"] = heldout_eval_prompts(settings.heldout_prompts, settings.heldout_seed)
    return sets


def gain_summary(gains: dict[int, float]) -> dict[str, Any]:
    """Per-seed accuracy gains (points) and their mean, min and standard deviation."""
    values = list(gains.values())
    return {
        "gain_points_by_seed": {str(k): v for k, v in gains.items()},
        "mean_gain_points": statistics.fmean(values),
        "min_gain_points": min(values),
        "std_gain_points": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def objective_kwargs(settings: DemoSettings, objective_name: str = "leapalign", **overrides: Any) -> dict[str, Any]:
    """The objective config for ``objective_name`` at the settings' T and hinge (LeapAlign: alpha, leaps and
    the range its leap steps are drawn from too)."""
    hinge = settings.hinge_lambda if settings.reward == "score" else None  # log p <= 0: the loss is -log p
    kw: dict[str, Any] = {"num_steps": settings.num_steps, "hinge_lambda": hinge}
    if objective_name == "leapalign":
        kw |= {"alpha": settings.alpha, "num_leaps": settings.num_leaps, "max_idx": _leap_range_end(settings)}
    kw |= overrides
    return kw


def _leap_range_end(settings: DemoSettings) -> int | None:
    """The objective's ``max_idx``: ``max_leap_step`` capped at T (so a shorter ``--T`` keeps a valid range)."""
    return None if settings.max_leap_step is None else min(settings.max_leap_step, settings.num_steps)


def make_trainer(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    settings: DemoSettings,
    output_dir: str | Path,
    objective_name: str = "leapalign",
    objective: dict[str, Any] | None = None,
):
    """A :class:`LeapAlignTrainer` on the world's training prompts of ``settings.train_categories`` (seeded, disjoint
    seed from the eval set)."""
    from leapalign import LeapAlignConfig, LeapAlignTrainer  # the public API: this experiment sits on top of it

    config = LeapAlignConfig(
        output_dir=str(output_dir),
        seed=settings.seed,
        device="cpu",
        objective_name=objective_name,
        objective=objective if objective is not None else objective_kwargs(settings, objective_name),
        train_mode=settings.train_mode,
        lora_rank=settings.lora_rank,
        train_num_steps=settings.train_steps,
        train_batch_size=settings.batch_size,
        train_learning_rate=settings.learning_rate,
        train_lr_scheduler=settings.lr_schedule,
        train_ema_decay=settings.ema_decay,
        train_max_grad_norm=settings.max_grad_norm,
        train_trainable_dtype="float32",
        model_dtype="float32",
        # Eager, always: a compiled rollout rounds differently, and a run's numbers must not move with another
        # layer's auto-compile threshold (one seed moved 3 points when it did: benchmarks/results/demo_shapes/README.md).
        rollout_compile="off",
        sample_every=0,
        ckpt_every=0,
        ckpt_save_final=False,
    )
    prompts = training_prompts(settings.seed, settings.train_categories)
    return LeapAlignTrainer(config, model, reward=training_reward(scorer, settings.reward, settings.background_penalty, settings.colour_diversity), prompt_source=prompts)


class TimeLimitExceeded(RuntimeError):
    """Training ran past ``DemoSettings.time_limit_seconds``; the run is aborted, not reported."""


@dataclass
class TrainLog:
    """Per-step training metrics and the periodic evaluations of one run."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    last_eval: EvalResult | None = None  # the evaluation after the final step (images included)


def train_and_track(
    trainer: Any,
    settings: DemoSettings,
    evaluate_fn: Callable[[], EvalResult] | None,
    desc: str = "leapalign",
    show_progress: bool = True,
) -> TrainLog:
    """Run ``trainer.training_step`` exactly ``settings.train_steps`` times.

    ``evaluate_fn`` runs every ``eval_every`` steps and after the last one (EMA weights swapped in
    when the trainer keeps an EMA). With ``time_limit_seconds`` > 0, training time beyond it
    (evaluation excluded) raises :class:`TimeLimitExceeded`: a run is either complete or not reported.
    """
    from tqdm.auto import tqdm

    log = TrainLog()
    progress = tqdm(total=settings.train_steps, desc=desc, disable=not show_progress, leave=True)

    def run_eval(step: int) -> None:
        if evaluate_fn is None:
            return
        ema = getattr(trainer, "ema", None)
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            res = evaluate_fn()
        log.last_eval = res
        log.evals.append({"step": step, "train_seconds": round(log.train_seconds, 3), **res.to_json()})
        if show_progress:
            progress.write(f"{desc} step {step}: accuracy {100 * res.accuracy['overall']:.1f}%, reward {res.reward:.3f}, "
                           f"background artifacts {100 * res.artifact_share:.2f}%")

    try:
        for step in range(settings.train_steps):
            t0 = time.perf_counter()
            metrics = trainer.training_step()
            log.train_seconds += time.perf_counter() - t0
            log.steps.append({"step": step + 1, "seconds": log.train_seconds, **{k: float(v) for k, v in metrics.items()}})
            progress.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}", refresh=False)
            progress.update(1)
            if settings.time_limit_seconds and log.train_seconds > settings.time_limit_seconds and step + 1 < settings.train_steps:
                raise TimeLimitExceeded(
                    f"training took {log.train_seconds:.0f} s for {step + 1} of {settings.train_steps} steps, over the time limit of "
                    f"{settings.time_limit_seconds:g} s: aborted (a shorter run would not be comparable; lower the load, or raise or "
                    "drop the limit)")
            if step + 1 == settings.train_steps or (step + 1) % settings.eval_every == 0:
                run_eval(step + 1)
    finally:
        progress.close()
    return log


def measure_memory_time(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    prompts: Sequence[str],
    settings: DemoSettings,
    methods: Sequence[str] = ("leapalign", "full_backprop"),
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Bytes saved for backward, peak RSS and seconds per iteration (forward+backward) per objective.

    Same model, prompts, batch, T and noise for every method; times are the median of ``repeats``
    after one warm-up. Gradients are cleared after each run (the model is not updated).
    """
    params = [p for p in model.transformer.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    cond = model.encode_prompts(list(prompts))
    try:
        rows = [_measure_method(model, scorer, cond, prompts, settings, name, repeats) for name in methods]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    base = next((r for r in rows if r["method"] == "full_backprop"), None)
    for r in rows:
        if base is not None:
            r["saved_vs_full"] = r["saved_bytes"] / base["saved_bytes"] if base["saved_bytes"] else None
            r["time_vs_full"] = r["seconds_per_iter"] / base["seconds_per_iter"]
    return rows


def _measure_method(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    cond: Any,
    prompts: Sequence[str],
    settings: DemoSettings,
    name: str,
    repeats: int,
) -> dict[str, Any]:
    """One row of :func:`measure_memory_time`: the objective ``name``, memory from its first run."""
    from leapalign.objectives import build_objective
    from leapalign.profiling import PeakMemory, SavedTensorCounter

    obj = build_objective(name, **objective_kwargs(settings, name))
    times: list[float] = []
    saved = peak = None
    reset = False
    warmup = 1 if repeats > 1 else 0
    for r in range(repeats + warmup):
        g = torch.Generator().manual_seed(settings.seed + r)
        with PeakMemory("cpu") as pm:
            t0 = time.perf_counter()
            with SavedTensorCounter() as counter:
                out = obj(model, cond, list(prompts), training_reward(scorer, settings.reward, settings.background_penalty, settings.colour_diversity), generator=g)
            out.loss.backward()
            dt = time.perf_counter() - t0
        if r == 0:
            saved = counter.bytes
            peak, reset = pm.report.peak_delta, pm.report.peak_rss_reset
        if r >= warmup:
            times.append(dt)
        del out
        model.zero_grad(set_to_none=True)
    return {
        "method": name,
        "T": settings.num_steps,
        "batch_size": len(prompts),
        "saved_bytes": saved,
        "peak_rss_delta_bytes": peak,
        "peak_rss_reset": reset,
        "seconds_per_iter": statistics.median(times),
        "seconds_all": [round(t, 4) for t in times],
    }


def reading(before: EvalResult, after: EvalResult, judge_target: bool = True) -> str:
    """One sentence on one run: accuracy gain (against the 15-point target when ``judge_target``), or a
    hacked scorer called out. Runs shorter than the demo's (``--quick``) pass ``judge_target=False``."""
    d_acc = 100 * (after.accuracy["overall"] - before.accuracy["overall"])
    d_rew = after.reward - before.reward
    if not judge_target:
        return f"rule-based accuracy {d_acc:+.1f} points, reward {d_rew:+.3f} (a shortened run: the target and hacking are not judged)"
    if d_rew > 0.02 and d_acc < 2:
        return (f"reward up {d_rew:+.3f} but rule-based accuracy {d_acc:+.1f} points: the learned scorer is being "
                "hacked (it rewards images the exact evaluator rejects)")
    return f"rule-based accuracy {d_acc:+.1f} points (target >= 15 {'reached' if d_acc >= 15 else 'NOT reached'}), reward {d_rew:+.3f}"


TARGET_MEAN_POINTS = 15.0
TARGET_MIN_POINTS = 10.0


def seeds_reading(gains: dict[str, Any], judge_target: bool = True) -> str:
    """One sentence on a multi-seed demo against the target: mean >= +15 points, no seed below +10."""
    mean, low, n = gains["mean_gain_points"], gains["min_gain_points"], len(gains["gain_points_by_seed"])
    # One decimal, or two where one would round a miss of the target onto the bar (14.99 is not +15.0).
    near = abs(mean - TARGET_MEAN_POINTS) < 0.05 or abs(low - TARGET_MIN_POINTS) < 0.05
    head = f"accuracy gain over {n} seed{'s' if n > 1 else ''}: mean {mean:+.{2 if near else 1}f}, min {low:+.{2 if near else 1}f} points"
    if not judge_target:
        return head + " (a shortened run: the target is not judged)"
    if n < 3:
        return head + f" (the target, mean >= +{TARGET_MEAN_POINTS:g} with no seed below +{TARGET_MIN_POINTS:g}, is judged over >= 3 seeds: --seeds 0 1 2)"
    ok = mean >= TARGET_MEAN_POINTS and low >= TARGET_MIN_POINTS
    return head + f" (target mean >= +{TARGET_MEAN_POINTS:g} with no seed below +{TARGET_MIN_POINTS:g}: {'reached' if ok else 'NOT reached'})"

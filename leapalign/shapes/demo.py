"""``leapalign demo`` (``make demo``): watch LeapAlign align the shipped shapes-world model on a CPU.

What it does, in order, and what it writes to ``--out`` (default ``demo_out/``):

1. loads the shipped tiny Flux model and the learned scorer (``leapalign/assets/``);
2. samples a fixed evaluation set (:func:`leapalign.shapes.world.eval_prompts`, fixed noise seed)
   and reports the **rule-based accuracy** per GenEval-like category (the exact evaluator, which
   never trains) and the **reward** (the learned scorer, which is what LeapAlign maximises);
3. post-trains with :class:`leapalign.trainer.LeapAlignTrainer` and the ``leapalign`` objective for
   a fixed number of steps (capped by a wall-clock budget), evaluating every ``--eval-every`` steps;
4. reports again on the same prompts and noise, and writes ``before_after.png`` (top half before,
   bottom half after, same prompts and seeds), ``curves.png`` (reward and accuracy vs step),
   ``memory_time.md`` / ``.json`` (bytes saved for backward, peak RSS and seconds per iteration of
   LeapAlign vs naive full backprop at the same T) and ``summary.json`` (everything, with the command).

Tuned choices (see ``DemoSettings``; the runs behind them are in ``leapalign/assets/README.md``):
full fine-tune (the model has 1.9M parameters), AdamW lr 1e-4, 240 steps of batch 16 capped at
200 s of training, T = 12 for rollout and evaluation, alpha 0.3, two torch threads, and the
training reward the scorer's probability with the hinge ``relu(0.95 - r)``. Maximising ``log p``
instead weights each sample by ``1 / p`` and so pushes hardest on the worst images, where the
scorer is least reliable: with it the rule-based accuracy collapsed (24 % -> 7 % in 120 steps).

The learned scorer is a proxy, like HPS or PickScore: if the reward rises while the rule-based
accuracy does not, the scorer is being hacked, and ``summary.json`` says so (``reading``).
``--quick`` shrinks every budget so the whole run takes well under a minute (CI).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from leapalign.shapes.evaluator import accuracy_by_category, evaluate
from leapalign.shapes.model import ShapesVelocityModel, load_shapes_model
from leapalign.shapes.world import CATEGORIES, PromptSpec, eval_prompts, sample_specs

__all__ = [
    "DemoSettings",
    "EvalResult",
    "evaluate_alignment",
    "make_trainer",
    "train_and_track",
    "measure_memory_time",
    "build_parser",
    "main",
]


@dataclass
class DemoSettings:
    """The knobs of one alignment run on the shapes world (defaults: the tuned demo)."""

    train_steps: int = 240
    max_train_seconds: float = 200.0  # keeps `make demo` under 5 minutes on 2 cores (evals excluded from it)
    num_steps: int = 12  # T of the training rollout (and of the evaluation sampler)
    batch_size: int = 16
    learning_rate: float = 1e-4
    train_mode: str = "full"
    lora_rank: int = 16
    alpha: float = 0.3
    hinge_lambda: float = 0.95
    num_leaps: int = 2
    ema_decay: float = 0.0  # off: a 0.97 EMA did not steady the accuracy curve in a 240-step run
    max_grad_norm: float = 1.0
    eval_prompts: int = 96
    eval_every: int = 40
    eval_seed: int = 1234
    seed: int = 0
    reward: str = "score"  # what training maximises: "score" (scorer probability) or "log_score" (its log)

    def __post_init__(self) -> None:
        checks = {
            "train_steps": self.train_steps >= 1,
            "max_train_seconds": self.max_train_seconds > 0,
            "num_steps": self.num_steps >= 2,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "train_mode": self.train_mode in ("full", "lora"),
            "eval_prompts": self.eval_prompts >= 1,
            "eval_every": self.eval_every >= 1,
            "num_leaps": self.num_leaps in (1, 2, 3),
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "reward": self.reward in REWARDS,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DemoSettings.{name}={getattr(self, name)!r} is invalid")


class LogScoreReward:
    """``log p`` of the scorer (``logsigmoid`` of its logits): a ``RewardFn`` whose gradient does not
    vanish where the scorer's sigmoid saturates near 0, which is where most samples of a weak model sit."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(self.scorer.logits(images, prompts))


REWARDS = ("score", "log_score")


def training_reward(scorer: Any, name: str) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
    """The reward the objective maximises: the scorer itself (``score``) or :class:`LogScoreReward`."""
    if name == "score":
        return scorer
    if name == "log_score":
        return LogScoreReward(scorer)
    raise ValueError(f"reward must be one of {REWARDS}, got {name!r}")


@dataclass
class EvalResult:
    """Rule-based accuracy per category (+ overall) and mean scorer reward on the fixed eval set."""

    accuracy: dict[str, float]
    reward: float
    reward_by_category: dict[str, float]
    images: torch.Tensor = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "reward": self.reward, "reward_by_category": self.reward_by_category}


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
    return EvalResult(accuracy_by_category(judgements), float(rewards.mean()), reward_by_category, images)


def objective_kwargs(settings: DemoSettings, objective_name: str = "leapalign", **overrides: Any) -> dict[str, Any]:
    """The objective config for ``objective_name`` at the settings' T and hinge (LeapAlign: alpha, leaps too)."""
    hinge = settings.hinge_lambda if settings.reward == "score" else None  # log p <= 0: the loss is -log p
    kw: dict[str, Any] = {"num_steps": settings.num_steps, "hinge_lambda": hinge}
    if objective_name == "leapalign":
        kw |= {"alpha": settings.alpha, "num_leaps": settings.num_leaps}
    kw |= overrides
    return kw


def make_trainer(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    settings: DemoSettings,
    output_dir: str | Path,
    objective_name: str = "leapalign",
    objective: dict[str, Any] | None = None,
):
    """A :class:`LeapAlignTrainer` on the world's training prompts (seeded, disjoint seed from the eval set)."""
    from leapalign.config import LeapAlignConfig
    from leapalign.trainer import LeapAlignTrainer

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
        train_lr_scheduler="constant",
        train_ema_decay=settings.ema_decay,
        train_max_grad_norm=settings.max_grad_norm,
        train_trainable_dtype="float32",
        model_dtype="float32",
        sample_every=0,
        ckpt_every=0,
        ckpt_save_final=False,
    )
    # Training prompts: the world's sampler, all categories, a seed unrelated to the eval set's.
    prompts = [s.text for s in sample_specs(4096, seed=settings.seed + 100_003)]
    return LeapAlignTrainer(config, model, reward=training_reward(scorer, settings.reward), prompt_source=prompts)


@dataclass
class TrainLog:
    """Per-step training metrics and the periodic evaluations of one run."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_by: str = "steps"
    last_eval: EvalResult | None = None  # the evaluation after the final step (images included)


def train_and_track(
    trainer: Any,
    settings: DemoSettings,
    evaluate_fn: Callable[[], EvalResult] | None,
    desc: str = "leapalign",
    show_progress: bool = True,
) -> TrainLog:
    """Run ``trainer.training_step`` until ``train_steps`` or ``max_train_seconds`` of training time.

    Evaluation time is not counted against the budget; ``evaluate_fn`` runs every ``eval_every``
    steps and after the last one (EMA weights swapped in when the trainer keeps an EMA).
    """
    from tqdm.auto import tqdm

    log = TrainLog()
    progress = tqdm(total=settings.train_steps, desc=desc, disable=not show_progress, leave=True)

    def run_eval(step: int) -> None:
        if evaluate_fn is None:
            return
        ema = getattr(trainer, "ema", None)
        ctx = ema.swapped_in() if ema is not None else _NullContext()
        with ctx:
            res = evaluate_fn()
        log.last_eval = res
        log.evals.append({"step": step, "train_seconds": round(log.train_seconds, 3), **res.to_json()})

    try:
        for step in range(settings.train_steps):
            t0 = time.perf_counter()
            metrics = trainer.training_step()
            log.train_seconds += time.perf_counter() - t0
            log.steps.append({"step": step + 1, "seconds": log.train_seconds, **{k: float(v) for k, v in metrics.items()}})
            progress.update(1)
            progress.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}")
            last = step + 1 == settings.train_steps or log.train_seconds >= settings.max_train_seconds
            if log.train_seconds >= settings.max_train_seconds and step + 1 < settings.train_steps:
                log.stopped_by = "time"
            if last or (step + 1) % settings.eval_every == 0:
                run_eval(step + 1)
            if last:
                break
    finally:
        progress.close()
    return log


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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
    from leapalign.objectives import build_objective
    from leapalign.profiling import PeakMemory, SavedTensorCounter

    params = [p for p in model.transformer.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    cond = model.encode_prompts(list(prompts))
    rows = []
    try:
        for name in methods:
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
                        out = obj(model, cond, list(prompts), training_reward(scorer, settings.reward), generator=g)
                    out.loss.backward()
                    dt = time.perf_counter() - t0
                if r == 0:
                    saved = counter.bytes
                    peak, reset = pm.report.peak_delta, pm.report.peak_rss_reset
                if r >= warmup:
                    times.append(dt)
                del out
                model.zero_grad(set_to_none=True)
            rows.append({
                "method": name,
                "T": settings.num_steps,
                "batch_size": len(prompts),
                "saved_bytes": saved,
                "peak_rss_delta_bytes": peak,
                "peak_rss_reset": reset,
                "seconds_per_iter": statistics.median(times),
                "seconds_all": [round(t, 4) for t in times],
            })
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    base = next((r for r in rows if r["method"] == "full_backprop"), None)
    for r in rows:
        if base is not None:
            r["saved_vs_full"] = r["saved_bytes"] / base["saved_bytes"] if base["saved_bytes"] else None
            r["time_vs_full"] = r["seconds_per_iter"] / base["seconds_per_iter"]
    return rows


def memory_table_markdown(rows: Sequence[dict[str, Any]], command: str, machine: str) -> str:
    """The memory/time rows as a Markdown table, with the command and machine."""
    lines = [
        "# LeapAlign vs naive full BPTT on the shapes world",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"T = {rows[0]['T']}, batch = {rows[0]['batch_size']}, float32, CPU; time = median of forward+backward per iteration.",
        "",
        "| method | saved for backward (MiB) | peak RSS over the step (MiB) | s / iteration | saved vs full | time vs full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_rss_delta_bytes"] is None else f"{r['peak_rss_delta_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {r['method']} | {r['saved_bytes'] / 2**20:.2f} | {peak} | {r['seconds_per_iter']:.3f} | "
            f"{r.get('saved_vs_full', float('nan')):.3f} | {r.get('time_vs_full', float('nan')):.3f} |"
        )
    if not all(r["peak_rss_reset"] for r in rows):
        lines += ["", "Peak RSS could not be reset between runs (no /proc/self/clear_refs): it is a lifetime high-water mark minus the entry RSS."]
    return "\n".join(lines) + "\n"


def plot_curves(log: TrainLog, before: EvalResult, path: Path, train_reward: str = "score") -> Path:
    """Reward (eval set; training batch on its own axis) and rule-based accuracy (overall, per category) vs step.

    ``train_reward`` names what the training-batch curve is (``score`` = p or ``log_score`` = log p).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [{"step": 0, **before.to_json()}] + log.evals
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot([e["step"] for e in evals], [e["reward"] for e in evals], "o-", color="C1", label="eval set: mean p")
    ax_r.set(xlabel="optimiser step", ylabel="learned scorer p (eval set, fixed noise)", title="reward (what LeapAlign maximises)")
    if log.steps:
        ax_t = ax_r.twinx()
        ax_t.plot([s["step"] for s in log.steps], [s.get("reward_mean", math.nan) for s in log.steps], color="C0", alpha=0.4,
                  label=f"training batch: mean {'log p' if train_reward == 'log_score' else 'p'}")
        ax_t.set_ylabel(f"training batch {'log p' if train_reward == 'log_score' else 'p'}")
        ax_t.legend(loc="lower right", fontsize=8)
    ax_r.legend(loc="upper left", fontsize=8)
    ax_a.plot([e["step"] for e in evals], [100 * e["accuracy"]["overall"] for e in evals], "ko-", lw=2, label="overall")
    for c in CATEGORIES:
        if c in before.accuracy:
            ax_a.plot([e["step"] for e in evals], [100 * e["accuracy"][c] for e in evals], "--", alpha=0.7, label=c)
    ax_a.set(xlabel="optimiser step", ylabel="accuracy (%)", title="rule-based accuracy (never trained on)")
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_before_after(before: torch.Tensor, after: torch.Tensor, path: Path, n: int = 24, nrow: int = 12) -> Path:
    """One PNG: ``n`` before images on top, the same prompts and noise after training below."""
    from leapalign.shapes.grid import save_image_grid

    n = min(n, before.shape[0])
    spacer = torch.ones(nrow, 3, before.shape[2], before.shape[3]) * 0.5
    rows_needed = -(-n // nrow) * nrow
    pad = torch.ones(rows_needed - n, *before.shape[1:])
    images = torch.cat([before[:n], pad, spacer[:nrow], after[:n], pad])
    return save_image_grid(images, path, nrow=nrow, scale=4)


def machine_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}"


def quick_settings() -> DemoSettings:
    """The ``--quick`` budget: a few steps, few prompts, tiny T; every output is still written."""
    return DemoSettings(train_steps=2, max_train_seconds=20.0, num_steps=3, batch_size=2, eval_prompts=6, eval_every=1000)


def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="leapalign demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny budget (a few steps, few prompts): end to end in < 60 s")
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint (default: the shipped one)")
    p.add_argument("--scorer", type=Path, default=None, help="learned scorer checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {d.train_steps}; quick 3)")
    p.add_argument("--max-train-seconds", type=float, default=None, help=f"wall-clock cap on training (default {d.max_train_seconds})")
    p.add_argument("--T", dest="num_steps", type=int, default=None, help=f"Euler steps of rollout and eval sampler (default {d.num_steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"prompts per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {d.learning_rate})")
    p.add_argument("--train-mode", choices=("full", "lora"), default=None, help=f"default {d.train_mode}")
    p.add_argument("--alpha", type=float, default=None, help=f"LeapAlign nested-gradient discount (default {d.alpha})")
    p.add_argument("--hinge", type=float, default=None, help=f"lambda of relu(lambda - r) with --reward score (default {d.hinge_lambda})")
    p.add_argument("--reward", choices=REWARDS, default=None, help=f"what training maximises: the scorer's probability or its log (default {d.reward})")
    p.add_argument("--eval-prompts", type=int, default=None, help=f"size of the fixed eval set (default {d.eval_prompts})")
    p.add_argument("--eval-every", type=int, default=None, help=f"evaluate every N steps (default {d.eval_every})")
    p.add_argument("--ema", type=float, default=None, help=f"EMA decay of the evaluated weights, 0 = off (default {d.ema_decay})")
    p.add_argument("--seed", type=int, default=None, help="training seed (noise, leap pairs, prompt order)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default); 2 steps 1.5x faster than 1 on 2 cores")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _settings_from_args(args: argparse.Namespace) -> DemoSettings:
    s = quick_settings() if args.quick else DemoSettings()
    overrides = {
        "train_steps": args.steps, "max_train_seconds": args.max_train_seconds, "num_steps": args.num_steps,
        "batch_size": args.batch_size, "learning_rate": args.lr, "train_mode": args.train_mode, "alpha": args.alpha,
        "hinge_lambda": args.hinge, "reward": args.reward, "eval_prompts": args.eval_prompts, "eval_every": args.eval_every, "seed": args.seed,
        "ema_decay": args.ema,
    }
    values = asdict(s) | {k: v for k, v in overrides.items() if v is not None}
    return DemoSettings(**values)


def _reading(before: EvalResult, after: EvalResult) -> str:
    d_acc = 100 * (after.accuracy["overall"] - before.accuracy["overall"])
    d_rew = after.reward - before.reward
    if d_rew > 0.02 and d_acc < 2:
        return (f"reward up {d_rew:+.3f} but rule-based accuracy {d_acc:+.1f} points: the learned scorer is being "
                "hacked (it rewards images the exact evaluator rejects)")
    if d_acc >= 15:
        return f"rule-based accuracy up {d_acc:+.1f} points (target >= 15 reached), reward {d_rew:+.3f}"
    return f"rule-based accuracy {d_acc:+.1f} points (target >= 15 {'reached' if d_acc >= 15 else 'NOT reached'}), reward {d_rew:+.3f}"


def _print_eval(title: str, res: EvalResult) -> None:
    acc = "  ".join(f"{c}={100 * v:.1f}%" for c, v in res.accuracy.items())
    print(f"{title}: reward={res.reward:.4f}  accuracy: {acc}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = _settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "leapalign demo " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    show = not args.no_progress

    from leapalign.shapes.scorer import load_shapes_scorer

    torch.manual_seed(settings.seed)
    model = load_shapes_model(args.model)
    scorer = load_shapes_scorer(args.scorer)
    specs = eval_prompts(settings.eval_prompts, settings.eval_seed)

    def run_eval() -> EvalResult:
        return evaluate_alignment(model, scorer, specs, settings.num_steps, settings.eval_seed)

    print(f"[demo] settings: {asdict(settings)}", flush=True)
    before = run_eval()
    _print_eval("[demo] before", before)

    # Memory/time table first, on the untouched model (same T and batch as the training run).
    table_prompts = [s.text for s in sample_specs(settings.batch_size, seed=7)]
    rows = measure_memory_time(model, scorer, table_prompts, settings, repeats=1 if args.quick else 2)
    machine = machine_description()
    (out / "memory_time.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2) + "\n")
    (out / "memory_time.md").write_text(memory_table_markdown(rows, command, machine))

    trainer = make_trainer(model, scorer, settings, out / "train")
    log = train_and_track(trainer, settings, run_eval, show_progress=show)
    after = log.last_eval if log.last_eval is not None else run_eval()
    _print_eval("[demo] after", after)

    save_before_after(before.images, after.images, out / "before_after.png")
    plot_curves(log, before, out / "curves.png", settings.reward)
    reading = _reading(before, after)
    summary = {
        "command": command,
        "machine": machine,
        "settings": asdict(settings),
        "before": before.to_json(),
        "after": after.to_json(),
        "accuracy_gain_points": 100 * (after.accuracy["overall"] - before.accuracy["overall"]),
        "reward_gain": after.reward - before.reward,
        "reading": reading,
        "train_steps_done": len(log.steps),
        "train_seconds": log.train_seconds,
        "stopped_by": log.stopped_by,
        "evals": log.evals,
        "train_metrics": log.steps,
        "memory_time": rows,
        "wall_seconds": time.perf_counter() - wall0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[demo] {reading}")
    for r in rows:
        print(f"[demo] {r['method']}: saved {r['saved_bytes'] / 2**20:.2f} MiB, {r['seconds_per_iter']:.3f} s/iter")
    print(f"[demo] wrote {out}/ (before_after.png, curves.png, memory_time.md/json, summary.json) in {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

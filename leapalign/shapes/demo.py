"""``leapalign demo`` (``make demo``): watch LeapAlign align the shipped shapes-world model on a CPU.

The command line over :mod:`leapalign.shapes.experiment` (the settings, training, evaluation and
measurement live there). What it does, in order, and what it writes to ``--out`` (default ``demo_out/``):

1. loads the shipped tiny Flux model and the learned scorer (``leapalign/assets/``);
2. samples a fixed evaluation set (:func:`leapalign.shapes.world.eval_prompts`, fixed noise seed)
   and reports the **rule-based accuracy** per GenEval-like category (the exact evaluator, which
   never trains) and the **reward** (the learned scorer, which is what LeapAlign maximises);
   and the same on a **held-out split** of prompts no alignment run trains on, with the share of
   background pixels that are not background colour (**artifacts** a hacked scorer may add);
3. for each of ``--seeds``, post-trains a fresh copy with :class:`leapalign.LeapAlignTrainer` and the
   ``leapalign`` objective for exactly ``--steps`` steps (a progress bar with ETA), evaluating every
   ``--eval-every`` steps;
4. reports again on the same prompts and noise, and writes ``before_after.png`` (top half before,
   bottom half after the first seed, same prompts and noise), ``curves.png`` (reward and accuracy vs
   step, every seed), ``memory_time.md`` / ``.json`` (bytes saved for backward, peak RSS and seconds
   per iteration of LeapAlign vs naive full backprop at the same T) and ``summary.json`` (everything,
   with the command: ``gain_points_by_seed``, ``mean_gain_points``, ``min_gain_points``, ...).

The numbers depend only on the settings and the seeds (and, in principle, the torch thread count,
which ``summary.json`` records): no clock decides how far a run trains. ``--time-limit`` aborts a
run that is too slow rather than reporting a truncated one. Threads: by default as many as the
machine has free cores (at most 2), with OpenMP's passive waiting, so a busy machine is not
oversubscribed; the choice is printed.

``make demo`` runs one seed (240 steps, evaluated every 60: ~3-5 minutes on an idle 2-core machine);
the target -- mean gain >= +15 points over three seeds, none below +10 -- is judged with ``--seeds 0 1 2``
(three times as long). It trains on prompts of the two categories the learned scorer judges best
(``--train-categories``; the eval sets cover all six) with three leaps (``--leaps``). The training reward is the
scorer minus 5 x a faint-background-texture penalty (``--background-penalty``; why:
``leapalign/assets/README.md``; what else was tried: ``benchmarks/results/demo_shapes/README.md``). If the reward rises while the rule-based accuracy does not, the scorer is being hacked, and
``summary.json`` says so (``reading``). ``--quick`` shrinks every budget so the whole run takes well
under a minute (CI); it does not judge the target.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from leapalign.shapes.threads import ThreadChoice, choose_threads, passive_wait

passive_wait()  # OpenMP reads its wait policy once, when torch loads it: this must come before `import torch`

import torch  # noqa: E402

from leapalign.shapes.evaluator import COLOUR_SHARES_KEY  # noqa: E402
from leapalign.shapes.experiment import (  # noqa: E402
    LR_SCHEDULES,
    REWARDS,
    DemoSettings,
    EvalResult,
    TimeLimitExceeded,
    TrainLog,
    eval_sets,
    evaluate_alignment,
    gain_summary,
    make_trainer,
    measure_memory_time,
    quick_settings,
    reading,
    seeds_reading,
    train_and_track,
    train_categories_arg,
)
from leapalign.shapes.model import ShapesVelocityModel, load_shapes_model  # noqa: E402
from leapalign.shapes.world import CATEGORIES, sample_specs  # noqa: E402

__all__ = ["DemoHooks", "build_parser", "main", "memory_table_markdown", "plot_curves", "save_before_after"]


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


def plot_curves(logs: dict[int, TrainLog], before: EvalResult, path: Path, train_reward: str = "score") -> Path:
    """Reward (eval set; training batch on its own axis) and rule-based accuracy vs step, one line per seed.

    With one seed the accuracy panel also shows each category. ``train_reward`` names what the
    training-batch curve is (``score`` = p or ``log_score`` = log p).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    ax_t = ax_r.twinx()
    what = "log p" if train_reward == "log_score" else "p"
    for i, (seed, log) in enumerate(logs.items()):
        evals = [{"step": 0, **before.to_json()}] + log.evals
        steps = [e["step"] for e in evals]
        ax_r.plot(steps, [e["reward"] for e in evals], "o-", color=f"C{i}", label=f"seed {seed}: eval set mean p")
        if log.steps:
            ax_t.plot([s["step"] for s in log.steps], [s.get("reward_mean", math.nan) for s in log.steps], color=f"C{i}", alpha=0.25)
        ax_a.plot(steps, [100 * e["accuracy"]["overall"] for e in evals], "o-", color=f"C{i}" if len(logs) > 1 else "k", lw=2,
                  label=f"seed {seed} overall" if len(logs) > 1 else "overall")
        if len(logs) == 1:
            for j, c in enumerate(CATEGORIES):
                if c in before.accuracy:
                    ax_a.plot(steps, [100 * e["accuracy"][c] for e in evals], "--", color=f"C{j + 1}", alpha=0.7, label=c)
    ax_r.set(xlabel="optimiser step", ylabel="learned scorer p (eval set, fixed noise)", title="reward (what LeapAlign maximises)")
    ax_t.set_ylabel(f"training batch mean {what} (faint)")
    ax_r.legend(loc="upper left", fontsize=7)
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


def machine_description(threads: ThreadChoice | None = None) -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "unknown" if threads is None or threads.load_average_1min is None else f"{threads.load_average_1min:.1f}"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"Python {platform.python_version()}, load average {load} at start")


@dataclass
class DemoHooks:
    """What an experiment driver (``python -m benchmarks screen``) may swap in a demo run: the trainer
    factory (same signature as :func:`make_trainer`), the scorer (else ``--scorer`` is loaded) and the command
    recorded in the summary. The defaults are the demo itself."""

    make_trainer: Callable[..., Any] = make_trainer
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor] | None = None
    command: str = "leapalign demo"


def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    q = quick_settings()
    p = argparse.ArgumentParser(prog="leapalign demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument("--quick", action="store_true", help="tiny budget (a few steps, few prompts): end to end in < 60 s; the target is not judged")
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=None,
                   help="training seeds, one fresh run each (default 0; the target is judged with --seeds 0 1 2)")
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint (default: the shipped one)")
    p.add_argument("--scorer", type=Path, default=None, help="learned scorer checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per seed (default {d.train_steps}; quick {q.train_steps})")
    p.add_argument("--time-limit", type=float, default=None,
                   help="abort (exit 1, no result) when one seed's training takes longer than this many seconds (default: no limit)")
    p.add_argument("--T", dest="num_steps", type=int, default=None, help=f"Euler steps of rollout and eval sampler (default {d.num_steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"prompts per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {d.learning_rate})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None, help=f"learning-rate schedule over the steps (default {d.lr_schedule})")
    p.add_argument("--train-mode", choices=("full", "lora"), default=None, help=f"default {d.train_mode}")
    p.add_argument("--alpha", type=float, default=None, help=f"LeapAlign nested-gradient discount (default {d.alpha})")
    p.add_argument("--leaps", type=int, choices=(1, 2, 3), default=None, help=f"LeapAlign's leaps per trajectory (default {d.num_leaps})")
    p.add_argument("--max-leap-step", type=int, default=None,
                   help=f"draw LeapAlign's leap steps from the first N of the T rollout steps (default {d.max_leap_step}; all T when None)")
    p.add_argument("--hinge", type=float, default=None, help=f"lambda of relu(lambda - r) with --reward score (default {d.hinge_lambda})")
    p.add_argument("--reward", choices=REWARDS, default=None, help=f"what training maximises: the scorer's probability or its log (default {d.reward})")
    p.add_argument("--background-penalty", type=float, default=None,
                   help=f"subtract this times the faint-background-texture penalty from the training reward (default {d.background_penalty})")
    p.add_argument("--colour-diversity", type=float, default=None,
                   help=f"subtract this times the batch's colour concentration on prompts that name no colour from the training reward (default {d.colour_diversity})")
    p.add_argument("--train-categories", nargs="+", choices=(*CATEGORIES, "all"), default=None, metavar="CATEGORY",
                   help=f"train on prompts of these categories only, 'all' for the whole grammar; the eval sets always "
                        f"cover all six (default {' '.join(d.train_categories or ('all',))}; one of {', '.join(CATEGORIES)})")
    p.add_argument("--eval-prompts", type=int, default=None, help=f"size of the fixed eval set (default {d.eval_prompts})")
    p.add_argument("--heldout-prompts", type=int, default=None, help=f"size of the held-out eval set, 0 = skip (default {d.heldout_prompts})")
    p.add_argument("--eval-every", type=int, default=None, help=f"evaluate every N steps (default {d.eval_every})")
    p.add_argument("--ema", type=float, default=None, help=f"EMA decay of the evaluated weights, 0 = off (default {d.ema_decay})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the free cores, at most 2, from the load average; printed and recorded)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _settings_from_args(args: argparse.Namespace) -> DemoSettings:
    s = quick_settings() if args.quick else DemoSettings()
    overrides = {
        "train_steps": args.steps, "time_limit_seconds": args.time_limit, "num_steps": args.num_steps,
        "batch_size": args.batch_size, "learning_rate": args.lr, "lr_schedule": args.lr_schedule, "train_mode": args.train_mode, "alpha": args.alpha, "num_leaps": args.leaps, "max_leap_step": args.max_leap_step,
        "hinge_lambda": args.hinge, "reward": args.reward, "eval_prompts": args.eval_prompts,
        "heldout_prompts": args.heldout_prompts, "eval_every": args.eval_every, "ema_decay": args.ema, "background_penalty": args.background_penalty,
        "colour_diversity": args.colour_diversity,
    }
    values = asdict(s) | {k: v for k, v in overrides.items() if v is not None}
    if args.train_categories is not None:
        values["train_categories"] = train_categories_arg(args.train_categories)
    return DemoSettings(**values)


def _print_eval(title: str, res: EvalResult) -> None:
    acc = "  ".join(f"{c}={100 * v:.1f}%" for c, v in res.accuracy.items())
    print(f"{title}: reward={res.reward:.4f}  artifacts={100 * res.artifact_share:.2f}%  accuracy: {acc}", flush=True)


def main(argv: Sequence[str] | None = None, hooks: DemoHooks | None = None) -> int:
    """``leapalign demo``; ``hooks`` let an experiment driver swap the trainer factory or the scorer."""
    hooks = hooks or DemoHooks()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings_from_args(args)
    except ValueError as exc:  # DemoSettings names the bad value: a usage error before any work, not a traceback
        parser.error(str(exc))
    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [settings.seed]))
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads.threads)
    print(f"[demo] {threads.describe()}", flush=True)
    command = f"{hooks.command} {shlex.join(argv)}".rstrip()  # no trailing space when there are no arguments
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()

    from leapalign.shapes.scorer import load_shapes_scorer

    base_model = load_shapes_model(args.model)
    scorer = hooks.scorer if hooks.scorer is not None else load_shapes_scorer(args.scorer)
    sets = eval_sets(settings)
    noise_seed = {"eval": settings.eval_seed, "heldout": settings.heldout_seed}

    def run_eval(model: ShapesVelocityModel, name: str) -> EvalResult:
        return evaluate_alignment(model, scorer, sets[name], settings.num_steps, noise_seed[name])

    shown = {k: v for k, v in asdict(settings).items() if k != "seed"}  # each run's seed is one of ``seeds``
    print(f"[demo] settings: {shown | {'seeds': seeds}}", flush=True)
    before = {name: run_eval(base_model, name) for name in sets}
    for name, res in before.items():
        _print_eval(f"[demo] before ({name}, {len(sets[name])} prompts)", res)
    # Memory/time table first, on the untouched model (same T and batch as the training run).
    machine, rows = _write_memory_time(base_model, scorer, settings, out, command, threads, repeats=1 if args.quick else 2)

    runs, logs, afters = [], {}, {}
    for seed in seeds:
        s = replace(settings, seed=seed)
        model = copy.deepcopy(base_model)  # every seed starts from the same weights
        trainer = hooks.make_trainer(model, scorer, s, out / "train" / f"seed{seed}")
        try:
            log = train_and_track(trainer, s, lambda: run_eval(model, "eval"), desc=f"[demo] seed {seed}", show_progress=not args.no_progress)
        except TimeLimitExceeded as exc:
            print(f"leapalign demo: error: seed {seed}: {exc}", file=sys.stderr)
            return 1
        after = {"eval": log.last_eval} | {name: run_eval(model, name) for name in sets if name != "eval"}
        for name, res in after.items():
            _print_eval(f"[demo] seed {seed} after ({name})", res)
        logs[seed], afters[seed] = log, after
        runs.append(_run_summary(seed, before, after, log, judge_target=not args.quick))

    save_before_after(before["eval"].images, afters[seeds[0]]["eval"].images, out / "before_after.png")
    plot_curves(logs, before["eval"], out / "curves.png", settings.reward)
    summary = _summary(command, machine, threads, settings, seeds, sets, before, runs, rows, judge_target=not args.quick)
    summary["wall_seconds"] = time.perf_counter() - wall0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_report(summary, out)
    return 0


def _top_colour(evaluation: dict[str, Any]) -> str:
    """The most common colour on colourless prompts and its share, e.g. ``red 68%``."""
    shares = evaluation[COLOUR_SHARES_KEY]
    if not shares:
        return "n/a"
    colour = max(shares, key=shares.get)
    return f"{colour} {100 * shares[colour]:.0f}%"


def _print_report(summary: dict[str, Any], out: Path) -> None:
    """The closing lines: each seed's reading, the target, held-out gains, artifacts, memory/time, outputs."""
    runs = summary["runs"]
    for r in runs:
        print(f"[demo] seed {r['seed']}: {r['reading']}")
    print(f"[demo] {summary['reading']}")
    if "heldout" in summary:
        print(f"[demo] held-out split: accuracy {100 * summary['heldout']['accuracy_before']:.1f}% before, gain by seed "
              + ", ".join(f"{r['seed']}: {r['heldout_gain_points']:+.1f}" for r in runs) + " points")
    print(f"[demo] background artifacts: {100 * summary['background_artifact_share']['before']:.2f}% of background pixels before, after by seed "
          + ", ".join(f"{r['seed']}: {100 * r['after']['eval']['background_artifact_share']:.2f}%" for r in runs))
    print(f"[demo] colours drawn where the prompt names none: most common {_top_colour(summary['before']['eval'])} before, "
          "after by seed " + ", ".join(f"{r['seed']}: {_top_colour(r['after']['eval'])}" for r in runs))
    for r in summary["memory_time"]:
        print(f"[demo] {r['method']}: saved {r['saved_bytes'] / 2**20:.2f} MiB, {r['seconds_per_iter']:.3f} s/iter")
    print(f"[demo] wrote {out}/ (before_after.png, curves.png, memory_time.md/json, summary.json) in {summary['wall_seconds']:.0f} s")


def _write_memory_time(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    settings: DemoSettings,
    out: Path,
    command: str,
    threads: ThreadChoice,
    repeats: int,
) -> tuple[str, list[dict[str, Any]]]:
    """Measure LeapAlign vs full backprop on a fixed batch; write ``memory_time.json``/``.md``; ``(machine, rows)``."""
    table_prompts = [s.text for s in sample_specs(settings.batch_size, seed=7)]
    rows = measure_memory_time(model, scorer, table_prompts, settings, repeats=repeats)
    machine = machine_description(threads)
    (out / "memory_time.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2) + "\n")
    (out / "memory_time.md").write_text(memory_table_markdown(rows, command, machine))
    return machine, rows


def _gain(before: EvalResult, after: EvalResult) -> float:
    return 100 * (after.accuracy["overall"] - before.accuracy["overall"])


def _run_summary(seed: int, before: dict[str, EvalResult], after: dict[str, EvalResult], log: TrainLog, judge_target: bool) -> dict[str, Any]:
    """One seed's results: after-evaluations, gains (points) on each set, reading, curves and metrics."""
    run = {
        "seed": seed,
        "after": {name: res.to_json() for name, res in after.items()},
        "accuracy_gain_points": _gain(before["eval"], after["eval"]),
        "reward_gain": after["eval"].reward - before["eval"].reward,
        "reading": reading(before["eval"], after["eval"], judge_target),
        "train_steps_done": len(log.steps),
        "train_seconds": log.train_seconds,
        "evals": log.evals,
        "train_metrics": log.steps,
    }
    if "heldout" in after:
        run["heldout_gain_points"] = _gain(before["heldout"], after["heldout"])
    return run


def _summary(command: str, machine: str, threads: ThreadChoice, settings: DemoSettings, seeds: list[int], sets: dict[str, Any],
             before: dict[str, EvalResult], runs: list[dict[str, Any]], rows: list[dict[str, Any]], judge_target: bool) -> dict[str, Any]:
    """Everything ``summary.json`` holds but the wall time."""
    gains = gain_summary({r["seed"]: r["accuracy_gain_points"] for r in runs})
    summary: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "threads": threads.to_json(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "seed"},
        "seeds": seeds,
        "eval_sets": {
            "eval": {"prompts": len(sets["eval"]), "noise_seed": settings.eval_seed, "drawn_from": "the whole grammar (world.eval_prompts)"},
            **({"heldout": {"prompts": len(sets["heldout"]), "noise_seed": settings.heldout_seed,
                            "drawn_from": "the held-out split (split.heldout_eval_prompts), never in an alignment run's training prompts"}}
               if "heldout" in sets else {}),
        },
        "before": {name: res.to_json() for name, res in before.items()},
        **gains,
        "reading": seeds_reading(gains, judge_target),
        "target_judged": judge_target,
        "background_artifact_share": {
            "before": before["eval"].artifact_share,
            "after_by_seed": {str(r["seed"]): r["after"]["eval"]["background_artifact_share"] for r in runs},
        },
    }
    if "heldout" in sets:
        held = {r["seed"]: r["heldout_gain_points"] for r in runs}
        summary["heldout"] = {
            "accuracy_before": before["heldout"].accuracy["overall"],
            "accuracy_after_by_seed": {str(r["seed"]): r["after"]["heldout"]["accuracy"]["overall"] for r in runs},
            "gain_points_by_seed": {str(k): v for k, v in held.items()},
            "mean_gain_points": sum(held.values()) / len(held),
        }
    summary |= {"runs": runs, "memory_time": rows}
    return summary


if __name__ == "__main__":
    sys.exit(main())

"""``leapalign demo`` (``make demo``): watch LeapAlign align the shipped shapes-world model on a CPU.

The command line over :mod:`leapalign.shapes.experiment` (the settings, training, evaluation and
measurement live there). What it does, in order, and what it writes to ``--out`` (default ``demo_out/``):

1. loads the shipped tiny Flux model and the learned scorer (``leapalign/assets/``);
2. samples a fixed evaluation set (:func:`leapalign.shapes.world.eval_prompts`, fixed noise seed)
   and reports the **rule-based accuracy** per GenEval-like category (the exact evaluator, which
   never trains) and the **reward** (the learned scorer, which is what LeapAlign maximises);
3. post-trains with :class:`leapalign.LeapAlignTrainer` and the ``leapalign`` objective for a fixed
   number of steps (capped by a wall-clock budget), evaluating every ``--eval-every`` steps;
4. reports again on the same prompts and noise, and writes ``before_after.png`` (top half before,
   bottom half after, same prompts and seeds), ``curves.png`` (reward and accuracy vs step),
   ``memory_time.md`` / ``.json`` (bytes saved for backward, peak RSS and seconds per iteration of
   LeapAlign vs naive full backprop at the same T) and ``summary.json`` (everything, with the command).

The defaults are the tuned :class:`~leapalign.shapes.experiment.DemoSettings` (two torch threads:
on 2 cores they step 1.5x faster than one). If the reward rises while the rule-based accuracy does
not, the scorer is being hacked, and ``summary.json`` says so (``reading``). ``--quick`` shrinks
every budget so the whole run takes well under a minute (CI).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from leapalign.shapes.experiment import (
    REWARDS,
    DemoSettings,
    EvalResult,
    TrainLog,
    evaluate_alignment,
    make_trainer,
    measure_memory_time,
    quick_settings,
    reading,
    train_and_track,
)
from leapalign.shapes.model import ShapesVelocityModel, load_shapes_model
from leapalign.shapes.world import CATEGORIES, eval_prompts, sample_specs

__all__ = ["build_parser", "main", "memory_table_markdown", "plot_curves", "save_before_after"]


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


def _print_eval(title: str, res: EvalResult) -> None:
    acc = "  ".join(f"{c}={100 * v:.1f}%" for c, v in res.accuracy.items())
    print(f"{title}: reward={res.reward:.4f}  accuracy: {acc}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = _settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "leapalign demo " + shlex.join(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()

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
    machine, rows = _write_memory_time(model, scorer, settings, out, command, repeats=1 if args.quick else 2)

    trainer = make_trainer(model, scorer, settings, out / "train")
    log = train_and_track(trainer, settings, run_eval, show_progress=not args.no_progress)
    after = log.last_eval if log.last_eval is not None else run_eval()
    _print_eval("[demo] after", after)

    save_before_after(before.images, after.images, out / "before_after.png")
    plot_curves(log, before, out / "curves.png", settings.reward)
    summary = _summary(command, machine, settings, before, after, log, rows)
    summary["wall_seconds"] = time.perf_counter() - wall0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[demo] {summary['reading']}")
    for r in rows:
        print(f"[demo] {r['method']}: saved {r['saved_bytes'] / 2**20:.2f} MiB, {r['seconds_per_iter']:.3f} s/iter")
    print(f"[demo] wrote {out}/ (before_after.png, curves.png, memory_time.md/json, summary.json) in {summary['wall_seconds']:.0f} s")
    return 0


def _write_memory_time(
    model: ShapesVelocityModel,
    scorer: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    settings: DemoSettings,
    out: Path,
    command: str,
    repeats: int,
) -> tuple[str, list[dict[str, Any]]]:
    """Measure LeapAlign vs full backprop on a fixed batch; write ``memory_time.json``/``.md``; ``(machine, rows)``."""
    table_prompts = [s.text for s in sample_specs(settings.batch_size, seed=7)]
    rows = measure_memory_time(model, scorer, table_prompts, settings, repeats=repeats)
    machine = machine_description()
    (out / "memory_time.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2) + "\n")
    (out / "memory_time.md").write_text(memory_table_markdown(rows, command, machine))
    return machine, rows


def _summary(command: str, machine: str, settings: DemoSettings, before: EvalResult, after: EvalResult, log: TrainLog,
             rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything ``summary.json`` holds but the wall time."""
    return {
        "command": command,
        "machine": machine,
        "settings": asdict(settings),
        "before": before.to_json(),
        "after": after.to_json(),
        "accuracy_gain_points": 100 * (after.accuracy["overall"] - before.accuracy["overall"]),
        "reward_gain": after.reward - before.reward,
        "reading": reading(before, after),
        "train_steps_done": len(log.steps),
        "train_seconds": log.train_seconds,
        "stopped_by": log.stopped_by,
        "evals": log.evals,
        "train_metrics": log.steps,
        "memory_time": rows,
    }


if __name__ == "__main__":
    sys.exit(main())

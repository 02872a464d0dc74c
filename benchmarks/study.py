"""``python -m benchmarks study``: LeapAlign vs its baselines on the shapes world at equal wall-clock.

Every run starts from the shipped shapes model, trains with :class:`leapalign.trainer.LeapAlignTrainer`
on the shipped learned scorer for the same **training wall-clock budget** (evaluation excluded;
cheap methods get more optimiser steps, which is the point of an equal-time comparison), and is
then judged on the fixed evaluation set (fixed noise) by the exact rule-based evaluator (accuracy
per GenEval-like category) and by the scorer (reward). Same T, batch, learning rate, hinge and
optimiser for every method; only the objective changes.

Groups of runs (each over ``--seeds`` training seeds):

- ``methods``: leapalign (alpha 0.3, 2 leaps), full_backprop (naive BPTT), draft_lv, refl, drtune;
- ``alpha``: leapalign with alpha in 0, 0.1, 0.3, 1 (0.3 shared with ``methods``);
- ``leaps``: leapalign with 1, 2, 3 leaps (2 shared with ``methods``).

Writes ``{out}.json`` (every run, updated after each so a killed study keeps its results),
``{out}.md`` (tables: mean +- std over seeds) and ``{out}.png``. The JSON and Markdown carry the
exact command and the machine block.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from benchmarks.machine import command_line, machine_info
from benchmarks.options import RESULTS_DIR, parse_suite_args, suite_parser

__all__ = ["RunSpec", "study_runs", "run_one", "summarise", "markdown_report", "build_parser", "main"]

DEFAULT_OUT = str(Path(RESULTS_DIR) / "study_shapes")
METHODS: tuple[str, ...] = ("leapalign", "full_backprop", "draft_lv", "refl", "drtune")
ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
LEAPS: tuple[int, ...] = (1, 2, 3)


class RunSpec(dict):
    """One configuration: ``label``, ``objective`` name, objective ``overrides``, and the ``groups`` it belongs to."""

    @property
    def key(self) -> str:
        return self["label"]


def study_runs(groups: Sequence[str]) -> list[RunSpec]:
    """The distinct configurations the requested ``groups`` need (shared points run once)."""
    runs: dict[str, RunSpec] = {}

    def add(label: str, objective: str, overrides: dict[str, Any], group: str) -> None:
        spec = runs.setdefault(label, RunSpec(label=label, objective=objective, overrides=overrides, groups=[]))
        spec["groups"].append(group)

    for g in groups:
        if g == "methods":
            for m in METHODS:
                add("leapalign a=0.3 leaps=2" if m == "leapalign" else m, m, {}, g)
        elif g == "alpha":
            for a in ALPHAS:
                add(f"leapalign a={a:g} leaps=2", "leapalign", {"alpha": a}, g)
        elif g == "leaps":
            for n in LEAPS:
                add(f"leapalign a=0.3 leaps={n}", "leapalign", {"num_leaps": n}, g)
        else:
            raise ValueError(f"unknown study group {g!r}; expected methods, alpha or leaps")
    return list(runs.values())


def run_one(spec: RunSpec, seed: int, settings: Any, scorer: Any, base_model: Any) -> dict[str, Any]:
    """Train a fresh copy of ``base_model`` with ``spec`` for ``settings.max_train_seconds``; evaluate.

    The model is copied in memory (not re-read from disk) so every run starts from the same weights
    even if the asset files change while a long study runs.
    """
    import copy

    from leapalign.shapes.experiment import evaluate_alignment, make_trainer, objective_kwargs, train_and_track
    from leapalign.shapes.world import eval_prompts

    s = replace(settings, seed=seed)
    if "alpha" in spec["overrides"]:
        s = replace(s, alpha=spec["overrides"]["alpha"])
    if "num_leaps" in spec["overrides"]:
        s = replace(s, num_leaps=spec["overrides"]["num_leaps"])
    model = copy.deepcopy(base_model)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="leapalign_study_") as tmp:
        trainer = make_trainer(model, scorer, s, tmp, spec["objective"], objective_kwargs(s, spec["objective"]))
        log = train_and_track(trainer, s, None, desc=f"{spec['label']} seed {seed}", show_progress=False)
    res = evaluate_alignment(model, scorer, eval_prompts(s.eval_prompts, s.eval_seed), s.num_steps, s.eval_seed)
    return {
        "label": spec["label"], "objective": spec["objective"], "overrides": spec["overrides"], "seed": seed,
        "steps": len(log.steps), "train_seconds": round(log.train_seconds, 2),
        "seconds_per_step": log.train_seconds / max(1, len(log.steps)),
        "train_reward_last": statistics.fmean(x.get("reward_mean", float("nan")) for x in log.steps[-5:]) if log.steps else None,
        **res.to_json(),
    }


def _asset_hashes(model: Path | None, scorer: Path | None) -> dict[str, str]:
    """sha256 of the model and scorer weights the study used (the shipped ones unless given)."""
    import hashlib

    from leapalign.shapes.model import shapes_model_files
    from leapalign.shapes.scorer import shapes_scorer_files

    weights = {"model": shapes_model_files(model)[0], "scorer": shapes_scorer_files(scorer)[0]}
    return {k: hashlib.sha256(f.read_bytes()).hexdigest() for k, f in weights.items()}


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: mean and std over seeds of reward, steps, overall and per-category accuracy."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["label"], []).append(r)
    out = {}
    for label, rs in by.items():
        cats = list(rs[0]["accuracy"])
        out[label] = {
            "n_seeds": len(rs),
            "reward": _mean_std([r["reward"] for r in rs]),
            "steps": _mean_std([r["steps"] for r in rs]),
            "accuracy": {c: _mean_std([r["accuracy"][c] for r in rs]) for c in cats},
            "reward_by_category": {c: _mean_std([r["reward_by_category"][c] for r in rs]) for c in rs[0]["reward_by_category"]},
        }
    return out


def markdown_report(data: dict[str, Any]) -> str:
    """Tables of the summary (accuracy in %, mean +- std over seeds), plus command, machine and reading."""
    summ, base = data["summary"], data["baseline"]
    cats = list(base["accuracy"])
    m = data["machine"]
    lines = [
        "# Shapes-world study: LeapAlign vs baselines at equal wall-clock",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, git {m.get('git_commit', '?')}, load average at start {m.get('load_average_1_5_15')} (shared machine)  ",
        f"Settings: {json.dumps(data['settings'])}  ",
        f"Training budget per run: {data['settings']['max_train_seconds']} s of training wall-clock (evaluation excluded); "
        f"seeds {data['seeds']}; eval set {data['settings']['eval_prompts']} prompts, fixed noise.",
        "",
    ]
    header = "| run | steps | reward | " + " | ".join(cats) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(cats)

    def row(label: str, s: dict[str, Any]) -> str:
        acc = " | ".join(f"{100 * s['accuracy'][c][0]:.1f} ± {100 * s['accuracy'][c][1]:.1f}" for c in cats)
        return f"| {label} | {s['steps'][0]:.0f} | {s['reward'][0]:.3f} ± {s['reward'][1]:.3f} | {acc} |"

    base_row = "| shipped model (no training) | 0 | " + f"{base['reward']:.3f} | " + " | ".join(f"{100 * base['accuracy'][c]:.1f}" for c in cats) + " |"
    for group, title in (("methods", "Methods"), ("alpha", "LeapAlign alpha sweep"), ("leaps", "LeapAlign number of leaps")):
        labels = [r["label"] for r in data["specs"] if group in r["groups"] and r["label"] in summ]
        if not labels:
            continue
        lines += [f"## {title}", "", "Rule-based accuracy (%) per category, reward = learned scorer on the eval set.", "", header, sep, base_row]
        lines += [row(label, summ[label]) for label in labels]
        lines.append("")
        if group == "methods":
            rcats = list(base["reward_by_category"])
            lines += ["Learned-scorer reward per category (mean ± std over seeds):", "",
                      "| run | " + " | ".join(rcats) + " |", "|---|" + "---:|" * len(rcats),
                      "| shipped model (no training) | " + " | ".join(f"{base['reward_by_category'][c]:.3f}" for c in rcats) + " |"]
            lines += [f"| {lab} | " + " | ".join(f"{summ[lab]['reward_by_category'][c][0]:.3f} ± {summ[lab]['reward_by_category'][c][1]:.3f}" for c in rcats) + " |"
                      for lab in labels]
            lines.append("")
    if data.get("reading"):
        lines += ["## Reading", "", data["reading"], ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Overall accuracy and reward per run (mean +- std over seeds), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = data["summary"]
    labels = [r["label"] for r in data["specs"] if r["label"] in summ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(labels))
    for ax, key, title in ((axes[0], "overall", "rule-based accuracy (%)"), (axes[1], "reward", "learned scorer reward")):
        if key == "reward":
            mean = [summ[lab]["reward"][0] for lab in labels]
            std = [summ[lab]["reward"][1] for lab in labels]
            ax.axhline(data["baseline"]["reward"], color="k", ls="--", label="shipped model")
        else:
            mean = [100 * summ[lab]["accuracy"]["overall"][0] for lab in labels]
            std = [100 * summ[lab]["accuracy"]["overall"][1] for lab in labels]
            ax.axhline(100 * data["baseline"]["accuracy"]["overall"], color="k", ls="--", label="shipped model")
        ax.bar(x, mean, yerr=std, capsize=3, color=["C0" if "leapalign" in lab else "C1" for lab in labels])
        ax.set_xticks(list(x), labels, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"shapes world, equal training wall-clock {data['settings']['max_train_seconds']} s/run, {len(data['seeds'])} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser("study", __doc__, threads_default=1)
    p.add_argument("--budget", type=float, default=30.0, help="training wall-clock seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--groups", nargs="+", default=["methods", "alpha", "leaps"], help="methods, alpha, leaps")
    p.add_argument("--T", dest="num_steps", type=int, default=None, help="Euler steps of rollout and eval sampler (demo default)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (demo default)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (demo default)")
    p.add_argument("--reward", choices=("score", "log_score"), default=None, help="training reward (demo default)")
    p.add_argument("--eval-prompts", type=int, default=48, help="size of the fixed eval set")
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint (default: shipped)")
    p.add_argument("--scorer", type=Path, default=None, help="scorer checkpoint (default: shipped)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output path stem: writes STEM.json, STEM.md, STEM.png (default: benchmarks/results/study_shapes)")
    p.add_argument("--reading", type=Path, default=None, help="a text file with the written reading to embed in the Markdown")
    p.add_argument("--render-only", action="store_true", help="run nothing: re-render STEM.md/.png from STEM.json (with --reading)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from leapalign.shapes.experiment import DemoSettings, evaluate_alignment
    from leapalign.shapes.model import load_shapes_model
    from leapalign.shapes.scorer import load_shapes_scorer
    from leapalign.shapes.world import eval_prompts

    args, argv = parse_suite_args(build_parser(), argv)
    out = Path(args.out)
    if args.render_only:
        data = json.loads(out.with_suffix(".json").read_text())
        data["summary"] = summarise(data["runs"])
        if args.reading:
            data["reading"] = args.reading.read_text().strip()
            out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown_report(data))
        plot(data, out.with_suffix(".png"))
        print(f"[study] re-rendered {out}.md/.png from {out}.json")
        return 0
    base = DemoSettings()
    settings = replace(
        base, max_train_seconds=args.budget, train_steps=100_000, eval_prompts=args.eval_prompts,
        num_steps=args.num_steps or base.num_steps, batch_size=args.batch_size or base.batch_size,
        learning_rate=args.lr or base.learning_rate, reward=args.reward or base.reward,
    )
    specs = study_runs(args.groups)
    scorer = load_shapes_scorer(args.scorer)
    model = load_shapes_model(args.model)
    b = evaluate_alignment(model, scorer, eval_prompts(settings.eval_prompts, settings.eval_seed), settings.num_steps, settings.eval_seed)
    data: dict[str, Any] = {
        "command": command_line(["study", *argv]),
        "machine": machine_info(["study", *argv]),
        "settings": asdict(settings),
        "seeds": list(args.seeds),
        "specs": [dict(s) for s in specs],
        "baseline": b.to_json(),
        "assets_sha256": _asset_hashes(args.model, args.scorer),
        "runs": [],
        "reading": args.reading.read_text().strip() if args.reading else "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    total = len(specs) * len(args.seeds)
    t0 = time.perf_counter()
    for seed in args.seeds:  # seed-major: an interrupted study still has every method at the first seeds
        for spec in specs:
            r = run_one(spec, seed, settings, scorer, model)
            data["runs"].append(r)
            data["summary"] = summarise(data["runs"])
            out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
            print(f"[study {len(data['runs'])}/{total} {time.perf_counter() - t0:.0f}s] {r['label']} seed {seed}: "
                  f"{r['steps']} steps, reward {r['reward']:.3f}, accuracy {100 * r['accuracy']['overall']:.1f}%", flush=True)
    data["summary"] = summarise(data["runs"])
    data["wall_seconds"] = time.perf_counter() - t0
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_report(data))
    plot(data, out.with_suffix(".png"))
    print(f"[study] wrote {out}.json/.md/.png in {data['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

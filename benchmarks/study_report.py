"""The study's report: Markdown tables and the accuracy-vs-wall-clock plot, from the study's JSON.

Split from :mod:`benchmarks.study` (which runs the study) so ``--render-only`` and the runner share one
renderer; nothing here trains or reads a checkpoint.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["GROUP_TITLES", "markdown_report", "plot", "reference_label"]

LEGACY_REFERENCE = "leapalign a=0.3 leaps=2"  # the reference of studies written before it was recorded in their JSON
# leapalign.shapes.evaluator.COLOUR_SHARES_KEY (tested equal): this module renders reports without loading torch
COLOUR_KEY = "colour_shares_colourless_prompts"
GROUP_TITLES = {"methods": "Methods", "alpha": "LeapAlign alpha sweep", "leaps": "LeapAlign number of leaps"}


def reference_label(data: dict[str, Any]) -> str:
    """The run every other is compared with: LeapAlign at the demo's settings when the study ran."""
    return data.get("reference", LEGACY_REFERENCE)


def markdown_report(data: dict[str, Any]) -> str:
    """Tables (accuracy in %, mean +- std over seeds), the paired comparisons, command, machine, calibration, reading."""
    summ, base, cmp = data["summary"], data["baseline"], data.get("comparisons", {})
    cats = list(base["accuracy"])
    m, cal = data["machine"], data["calibration"]
    lines = [
        "# Shapes-world study: LeapAlign vs baselines at equal training time",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, git {m.get('git_commit', '?')}, "
        f"load average at start {m.get('load_average_1_5_15')}; {data['jobs']} runs side by side, 1 thread each  ",
        f"Settings: {json.dumps(data['settings'])}  ",
        f"Training budget per run: {data['leapalign_steps']} steps of LeapAlign = {data['budget_seconds']:.0f} s at the calibrated "
        f"speed; other runs get the steps that take the same time (calibration: `{cal.get('command', '?')}`, load average "
        f"{cal.get('machine', {}).get('load_average_1_5_15')}, s/step {json.dumps({k: round(v, 3) for k, v in cal['seconds_per_step'].items()})}).  ",
        f"Seeds {data['seeds']}; training prompts from {_training_categories(data['settings'])}; "
        f"eval set {data['settings']['eval_prompts']} prompts (whole grammar), held-out set "
        f"{data['settings']['heldout_prompts']} prompts (never trained on by any run), fixed noise.",
        "",
    ]
    held = "heldout" in base
    colour = bool(summ) and all("top_colour_share" in s for s in summ.values())  # studies from before the metric lack it
    header = ("| run | steps | reward | artifacts (%) | " + " | ".join(cats) + (" | held-out" if held else "")
              + (" | top colour (%) |" if colour else " |"))
    sep = "|---|---:|---:|---:|" + "---:|" * len(cats) + ("---:|" if held else "") + ("---:|" if colour else "")

    def pm(x: tuple[float, float], scale: float = 100.0, fmt: str = ".1f") -> str:
        return f"{scale * x[0]:{fmt}} ± {scale * x[1]:{fmt}}"

    def row(label: str, s: dict[str, Any]) -> str:
        acc = " | ".join(pm(s["accuracy"][c]) for c in cats)
        h = f" | {pm(s['heldout'])}" if held else ""
        top = f" | {pm(s['top_colour_share'], 100, '.0f')}" if colour else ""
        return f"| {label} | {s['steps'][0]:.0f} | {pm(s['reward'], 1, '.3f')} | {pm(s['artifacts'], 100, '.2f')} | {acc}{h}{top} |"

    base_top = f" | {100 * max(base[COLOUR_KEY].values()):.0f}" if colour and base.get(COLOUR_KEY) else (" | " if colour else "")
    base_row = (f"| shipped model (no training) | 0 | {base['reward']:.3f} | {100 * base['background_artifact_share']:.2f} | "
                + " | ".join(f"{100 * base['accuracy'][c]:.1f}" for c in cats)
                + (f" | {100 * base['heldout']['accuracy']['overall']:.1f}" if held else "") + base_top + " |")
    for group, title in GROUP_TITLES.items():
        labels = [r["label"] for r in data["specs"] if group in r["groups"] and r["label"] in summ]
        if not labels:
            continue
        lines += [f"## {title}", "", "Rule-based accuracy (%) per category and on the held-out split, mean ± std over seeds; "
                  "reward = learned scorer; artifacts = share of background pixels off the background colour"
                  + ("; top colour = the most common colour's share of the objects drawn for prompts that name no colour "
                     "(20 % when all five are equally common)" if colour else "") + ".", "",
                  header, sep, base_row]
        lines += [row(label, summ[label]) for label in labels]
        pairs = [lab for lab in labels if lab in cmp]
        if pairs:
            lines += ["", f"Paired comparison with {reference_label(data)} (overall accuracy on the eval set, same seeds and prompts; "
                      "paired bootstrap over prompts, 10,000 resamples):", ""]
            lines += [f"- {cmp[lab]['verdict']}" for lab in pairs]
        lines.append("")
    if data.get("reading"):
        lines += ["## Reading", "", data["reading"], ""]
    return "\n".join(lines)


def _training_categories(settings: dict[str, Any]) -> str:
    categories = settings.get("train_categories")  # absent: a study from before the setting, on the whole grammar
    return "the whole grammar" if not categories else ", ".join(categories) + " only"


def plot(data: dict[str, Any], path: Path) -> Path:
    """Overall accuracy vs calibrated training wall-clock, one panel per group: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUP_TITLES if any(g in s["groups"] for s in data["specs"])]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    base = 100 * data["baseline"]["accuracy"]["overall"]
    for ax, group in zip(axes[0], groups):
        for i, spec in enumerate(s for s in data["specs"] if group in s["groups"]):
            runs = [r for r in data["runs"] if r["label"] == spec["label"]]
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            xs = [0.0] + [statistics.fmean(r["curve"][k]["calibrated_seconds"] for r in runs) for k in range(n)]
            ys = [[base] + [100 * r["curve"][k]["accuracy"] for k in range(n)] for r in runs]
            cols = list(zip(*ys))
            ax.plot(xs, [statistics.fmean(c) for c in cols], "o-", color=f"C{i}", lw=2.5 if spec["label"] == reference_label(data) else 1.5, label=spec["label"])
            ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=f"C{i}", alpha=0.15)
        ax.set(xlabel="training wall-clock (s, calibrated)", ylabel="rule-based accuracy (%)", title=GROUP_TITLES[group])
        ax.legend(fontsize=7)
    fig.suptitle(f"shapes world: equal training time ({data['budget_seconds']:.0f} s = {data['leapalign_steps']} LeapAlign steps), "
                 f"{len(data['seeds'])} seeds, mean and min-max band", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Paired comparison of two alignment methods on the same evaluation prompts and seeds.

Each run of a study stores the evaluator's verdict (correct or not) for every prompt of the fixed
evaluation set. Two methods trained with the same seeds and judged on the same prompts and noise
form *pairs*; :func:`paired_bootstrap` compares them without assuming the prompts are independent
of the method: it resamples the **prompts** with replacement (the same resample for both methods
and every seed), recomputes the mean accuracy difference each time, and reports its 95 % percentile
interval and a two-sided p-value (twice the smaller share of resampled differences on either side
of zero). Seeds are averaged inside each resample rather than resampled: with three seeds a seed
bootstrap would be meaningless. The spread between seeds is reported separately (mean +- std).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import statistics
from typing import Any, Sequence

import torch

from leapalign.shapes.evaluator import COLOUR_SHARES_KEY

__all__ = ["PairedComparison", "paired_bootstrap", "summarise_runs", "compare_with"]


@dataclass(frozen=True)
class PairedComparison:
    """``b - a`` in accuracy points over the same prompts and seeds, with its bootstrap interval and p-value."""

    diff_points: float
    ci_low: float
    ci_high: float
    p_value: float
    n_prompts: int
    n_seeds: int
    resamples: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)

    def verdict(self, name_a: str, name_b: str, alpha: float = 0.05) -> str:
        """``name_b`` ahead / behind / tied with ``name_a``, with the interval and p-value."""
        if self.p_value < alpha:
            where = "ahead of" if self.diff_points > 0 else "behind"
        else:
            where = "tied with (no significant difference from)"
        p = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"  # the floor is 1 / resamples
        return (f"{name_b} is {where} {name_a}: {self.diff_points:+.1f} points, 95 % CI [{self.ci_low:+.1f}, {self.ci_high:+.1f}], "
                f"{p} (paired bootstrap over {self.n_prompts} prompts x {self.n_seeds} seeds)")


def paired_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    """Compare per-prompt verdicts ``a[s][i]`` and ``b[s][i]`` (seed ``s``, prompt ``i``; same prompts, same seeds)."""
    ta = torch.tensor([list(map(bool, r)) for r in a], dtype=torch.float64)
    tb = torch.tensor([list(map(bool, r)) for r in b], dtype=torch.float64)
    if ta.shape != tb.shape or ta.ndim != 2 or ta.numel() == 0:
        raise ValueError(f"a and b must be [seeds, prompts] verdicts of the same non-empty shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    per_prompt = (tb - ta).mean(0)  # [prompts], averaged over seeds
    n = per_prompt.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    boot = 100 * per_prompt[idx].mean(1)
    diff = 100 * float(per_prompt.mean())
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    if torch.all(per_prompt == 0):
        p = 1.0
    else:
        p = min(1.0, max(1.0 / resamples, 2 * min(float((boot <= 0).double().mean()), float((boot >= 0).double().mean()))))
    return PairedComparison(diff, low, high, p, n, ta.shape[0], resamples)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: mean and std over seeds of accuracy (overall, per category, held-out), reward, artifacts, steps, and
    (runs that measured it) the most common colour's share of the objects drawn for colourless prompts."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["label"], []).append(r)
    out = {}
    for label, rs in by.items():
        out[label] = {
            "n_seeds": len(rs),
            "steps": _mean_std([r["steps"] for r in rs]),
            "reward": _mean_std([r["reward"] for r in rs]),
            "artifacts": _mean_std([r["background_artifact_share"] for r in rs]),
            "accuracy": {c: _mean_std([r["accuracy"][c] for r in rs]) for c in rs[0]["accuracy"]},
            **({"heldout": _mean_std([r["heldout"]["accuracy"]["overall"] for r in rs])} if "heldout" in rs[0] else {}),
            **({"top_colour_share": _mean_std([max(r[COLOUR_SHARES_KEY].values()) for r in rs])}
               if all(r.get(COLOUR_SHARES_KEY) for r in rs) else {}),
        }
    return out


def compare_with(reference: str, runs: Sequence[dict[str, Any]], labels: Sequence[str], resamples: int = 10_000) -> dict[str, dict[str, Any]]:
    """Every label against ``reference`` on the seeds both have, from the runs' per-prompt verdict strings
    (``correct``: "0"/"1" per eval prompt): :func:`paired_bootstrap` over prompts."""
    by = {(r["label"], r["seed"]): r for r in runs}
    out = {}
    for label in labels:
        if label == reference:
            continue
        seeds = sorted(s for (lab, s) in by if lab == label and (reference, s) in by)
        if not seeds:
            continue
        ref = [[c == "1" for c in by[(reference, s)]["correct"]] for s in seeds]
        other = [[c == "1" for c in by[(label, s)]["correct"]] for s in seeds]
        cmp = paired_bootstrap(ref, other, resamples=resamples)
        out[label] = cmp.to_json() | {"seeds": seeds, "verdict": cmp.verdict(reference, label)}
    return out

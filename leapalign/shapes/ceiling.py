"""How far can a scorer lead alignment? Best-of-K ranking of the unaligned model's own samples.

``python -m leapalign.shapes.ceiling [--scorer PATH]`` samples every prompt of a fixed set ``--draws``
times (fixed noise) from the shapes model, judges each image with the rule-based evaluator and
scores it with the scorer, and reports per category:

- ``average``: the evaluator's accuracy of a random sample (what the model does now);
- ``top1``: the accuracy of the sample the scorer ranks first for each prompt (what reward
  maximisation can reach by re-weighting what the model already draws);
- ``any``: the share of prompts with at least one correct sample (the model's reachable set);
- ``auc``: within each prompt, the probability that a correct sample outscores a wrong one (ties
  half), pooled over the prompts that have both -- how well the scorer ranks the images it will be
  asked about, independent of how many are correct.

A scorer with a low ``auc`` in a category cannot move that category: its gradient points nowhere in
particular. The prompt set defaults to a seed no eval set uses.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from leapalign.shapes.experiment import evaluate_alignment
from leapalign.shapes.harden import auc
from leapalign.shapes.model import load_shapes_model
from leapalign.shapes.scorer import load_shapes_scorer
from leapalign.shapes.world import CATEGORIES, eval_prompts

__all__ = ["ranking_ceiling", "build_parser", "main"]


def ranking_ceiling(model: Any, scorer: Any, prompts: int = 192, draws: int = 8, num_steps: int = 12, seed: int = 777,
                    show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Per category (and ``overall``): ``average``, ``top1``, ``any`` (in [0, 1]) and within-prompt ``auc``.

    Each draw is :func:`~leapalign.shapes.experiment.evaluate_alignment` of the same prompts with noise seed
    ``seed * 1000 + draw``; the AUC is :func:`~leapalign.shapes.harden.auc` per prompt, pooled over the
    prompts' (correct, wrong) pairs.
    """
    if prompts < 1 or draws < 2:
        raise ValueError(f"need prompts >= 1 and draws >= 2 (a ranking needs two samples), got {prompts}, {draws}")
    specs = eval_prompts(prompts, seed)
    runs = [evaluate_alignment(model, scorer, specs, num_steps, seed * 1000 + k)
            for k in tqdm(range(draws), desc="ceiling: draws", disable=not show_progress)]
    ok = torch.tensor([r.correct for r in runs], dtype=torch.float32)  # [draws, prompts]
    sc = torch.tensor([r.rewards for r in runs])
    top1 = ok[sc.argmax(0), torch.arange(prompts)]
    out = {}
    for cat in (*CATEGORIES, "overall"):
        idx = [i for i, s in enumerate(specs) if cat in ("overall", s.category)]
        if not idx:
            continue
        pairs = [(int(ok[:, i].sum()) * int((1 - ok[:, i]).sum()), i) for i in idx]  # (correct x wrong samples, prompt)
        total = sum(n for n, _ in pairs)
        pooled = sum(n * auc(sc[:, i], ok[:, i]) for n, i in pairs if n) / total if total else float("nan")
        out[cat] = {"average": float(ok[:, idx].mean()), "top1": float(top1[idx].mean()),
                    "any": float(ok[:, idx].amax(0).mean()), "auc": pooled}
    return out


def markdown_table(result: dict[str, dict[str, float]]) -> str:
    cats = list(result)
    rows = ["| | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for key, name in (("average", "average sample (%)"), ("top1", "scorer's top 1 (%)"), ("any", "any sample correct (%)")):
        rows.append(f"| {name} | " + " | ".join(f"{100 * result[c][key]:.1f}" for c in cats) + " |")
    rows.append("| within-prompt AUC | " + " | ".join(f"{result[c]['auc']:.3f}" for c in cats) + " |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leapalign.shapes.ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--scorer", type=Path, default=None, help="scorer checkpoint (default: the shipped one)")
    p.add_argument("--model", type=Path, default=None, help="shapes model checkpoint (default: the shipped one)")
    p.add_argument("--prompts", type=int, default=192, help="prompts (categories balanced)")
    p.add_argument("--draws", type=int, default=8, help="samples per prompt (the K of best-of-K)")
    p.add_argument("--T", dest="num_steps", type=int, default=12, help="Euler steps of the sampler (the demo's)")
    p.add_argument("--seed", type=int, default=777, help="prompt set and noise seed (the eval sets use 1234 and 4321)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None and args.json.is_dir():
        raise SystemExit(f"python -m leapalign.shapes.ceiling: error: --json {args.json} is a directory; name the JSON file to write")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scorer = load_shapes_scorer(args.scorer).requires_grad_(False)
        result = ranking_ceiling(load_shapes_model(args.model), scorer, args.prompts, args.draws, args.num_steps, args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"python -m leapalign.shapes.ceiling: error: {e}") from None
    print(markdown_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scorer": str(args.scorer or "shipped"), "model": str(args.model or "shipped"),
                                         "prompts": args.prompts, "draws": args.draws, "T": args.num_steps, "seed": args.seed,
                                         "result": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Harden the shapes scorer against the images LeapAlign learns to make (reward-model rounds).

``python -m leapalign.shapes.harden --out DIR`` starts from a trained scorer and repeats, ``--rounds``
times: (1) align a fresh copy of the shapes model to the *current* scorer with the demo's own
trainer and settings, snapshotting samples every ``--snapshot-every`` steps -- the images an
optimiser finds when it pushes on this reward, hacks included -- and the same images pushed straight
up the scorer in pixel space (``--pixel-attack-steps``); (2) label them with the rule-based
evaluator and the exact detector (verdict, per-(colour, shape) counts and centres); (3) continue
training the scorer on the rendered pool plus every labelled sample so far, half of each batch from
the samples.

This is how preference-trained rewards are refreshed in practice (label the policy's own outputs,
retrain), with the evaluator as the labeller. The evaluator still never trains on anything and
stays the judge; the scorer stays a learned CNN that can be hacked, only less easily. The round
log (how often the scorer ranked the aligned model's wrong images above its right ones, before and
after refitting) is written to the scorer's JSON ``meta.harden``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from leapalign.shapes.experiment import DemoSettings, make_trainer, train_and_track
from leapalign.shapes.model import load_shapes_model
from leapalign.shapes.pools import LabelledPool, model_samples, pixel_attack, synthetic_pool
from leapalign.shapes.scorer import fit, load_shapes_scorer, ranking_accuracy, save_shapes_scorer, shapes_scorer_files
from leapalign.shapes.world import CATEGORIES

__all__ = ["auc", "build_parser", "main"]


def _rounded(x: float) -> float | None:
    """JSON-safe: NaN (an empty class) becomes null."""
    return None if x != x else round(x, 4)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN if one class is empty."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos.view(-1, 1) - neg.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


@torch.no_grad()
def _score(scorer: torch.nn.Module, pool: LabelledPool, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([scorer(pool.images[i : i + batch_size], pool.prompts[i : i + batch_size]) for i in range(0, len(pool), batch_size)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leapalign.shapes.harden", description=__doc__.split("\n")[0])
    p.add_argument("--scorer", type=Path, default=None, help="scorer to start from (default: the shipped one)")
    p.add_argument("--model", type=Path, default=None, help="shapes model to align (default: the shipped one)")
    p.add_argument("--out", type=Path, required=True, help="directory for the hardened shapes_scorer.safetensors/.json")
    p.add_argument("--rounds", type=int, default=3, help="alignment rounds (0 with --base-refit-steps: only refit on unaligned samples)")
    p.add_argument("--align-steps", type=int, default=150, help="LeapAlign steps per round (demo settings otherwise)")
    p.add_argument("--snapshot-every", type=int, default=50, help="sample the aligned model every N steps")
    p.add_argument("--batch-size", type=int, default=DemoSettings.batch_size, help="prompts per alignment step (demo default)")
    p.add_argument("--T", dest="num_steps", type=int, default=DemoSettings.num_steps, help="Euler steps of rollout and samples (demo default)")
    p.add_argument("--samples", type=int, default=240, help="samples per snapshot, on fresh training prompts")
    p.add_argument("--base-samples", type=int, default=480, help="samples of the unaligned model added before round 1")
    p.add_argument("--focus", nargs="+", choices=CATEGORIES, default=(), metavar="CATEGORY",
                   help="categories the scorer ranks worst: --focus-samples more unaligned samples on their prompts only")
    p.add_argument("--focus-samples", type=int, default=0, help="unaligned samples on the --focus categories, added before round 1")
    p.add_argument("--base-refit-steps", type=int, default=0,
                   help="refit on the unaligned samples before round 1 (0: off), so round 1 aligns against the refitted scorer")
    p.add_argument("--pixel-attack-steps", type=int, default=10, help="also add each snapshot pushed up the scorer in pixel space (0: off)")
    p.add_argument("--pool", type=int, default=4000, help="rendered pairs kept in every refit")
    p.add_argument("--steps", type=int, default=600, help="scorer optimiser steps per refit")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the scorer's detection loss (counts + centres) in every refit")
    p.add_argument("--hard-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 0 or (args.rounds == 0 and not args.base_refit_steps):
        raise SystemExit(f"--rounds must be >= 1, or 0 with --base-refit-steps (a refit on unaligned samples only); got {args.rounds}")
    for name in ("align_steps", "snapshot_every", "samples", "pool", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.hard_fraction <= 1.0:
        raise SystemExit(f"--hard-fraction must be in [0, 1], got {args.hard_fraction}")
    if args.focus_samples < 0 or args.base_refit_steps < 0 or args.aux_weight < 0:
        raise SystemExit("--focus-samples, --base-refit-steps and --aux-weight must be >= 0")
    if args.base_refit_steps and not (args.base_samples or args.focus_samples):
        raise SystemExit("--base-refit-steps needs unaligned samples to refit on: --base-samples or --focus-samples")
    if bool(args.focus) != bool(args.focus_samples):
        raise SystemExit("--focus and --focus-samples go together: name the categories and how many samples to draw on them")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    scorer = load_shapes_scorer(args.scorer)
    g = torch.Generator().manual_seed(args.seed + 7)
    pool = synthetic_pool(args.pool, g)
    hard = _unaligned_samples(args)
    log: list[dict] = []
    if args.base_refit_steps and hard is not None:
        scorer.requires_grad_(True)
        fit(scorer, pool, args.base_refit_steps, g, lr=args.lr, aux_weight=args.aux_weight, hard=hard,
            hard_fraction=args.hard_fraction, desc="unaligned samples: refit")
        scorer.requires_grad_(False)
    for r in range(args.rounds):
        fresh = _aligned_samples(args, scorer, r)
        scores = _score(scorer, fresh)
        entry = {
            "round": r + 1,
            "samples": len(fresh),
            "evaluator_correct": round(float(fresh.labels.mean()), 4),
            "mean_score": round(float(scores.mean()), 4),
            "auc_before_refit": _rounded(auc(scores, fresh.labels)),
        }
        hard = fresh if hard is None else hard + fresh
        if args.pixel_attack_steps > 0:
            attacked = pixel_attack(scorer, fresh, args.pixel_attack_steps)
            entry |= {"pixel_attack_evaluator_correct": round(float(attacked.labels.mean()), 4),
                      "pixel_attack_mean_score": round(float(_score(scorer, attacked).mean()), 4)}
            hard = hard + attacked
        scorer.requires_grad_(True)
        fit(scorer, pool, args.steps, g, lr=args.lr, aux_weight=args.aux_weight, hard=hard,
            hard_fraction=args.hard_fraction, desc=f"round {r + 1}: refit")
        scorer.requires_grad_(False)
        entry["auc_after_refit"] = _rounded(auc(_score(scorer, fresh), fresh.labels))
        entry["minutes"] = round((time.time() - start) / 60, 2)
        log.append(entry)
        print(json.dumps(entry), flush=True)
    _save(scorer, args, argv, log, hard, start)
    return 0


def _unaligned_samples(args: argparse.Namespace) -> LabelledPool | None:
    """Labelled samples of the model before alignment: ``--base-samples`` on every category, ``--focus-samples``
    on the ``--focus`` ones (the scorer's weak categories get more of the images it misranks)."""
    model = load_shapes_model(args.model) if args.base_samples or args.focus_samples else None
    parts = []
    if args.base_samples:
        parts.append(model_samples(model, args.base_samples, args.num_steps, seed=args.seed + 5000))
    if args.focus_samples:
        parts.append(model_samples(model, args.focus_samples, args.num_steps, seed=args.seed + 6000, categories=tuple(args.focus)))
    return sum(parts[1:], parts[0]) if parts else None


def _aligned_samples(args: argparse.Namespace, scorer: torch.nn.Module, r: int) -> LabelledPool:
    """Round ``r``: align a fresh copy of the model to ``scorer``; its labelled samples every ``--snapshot-every`` steps."""
    model = load_shapes_model(args.model)
    # The whole grammar, not the demo's training categories: the scorer must hold up on aligned images of every category.
    # Whole grammar, 2 leaps and no colour prior are how the shipped scorer was made (leapalign/assets/README.md),
    # whatever the demo's defaults.
    settings = DemoSettings(train_steps=args.snapshot_every, eval_every=10**9, seed=1000 * (r + 1) + args.seed,
                            batch_size=args.batch_size, num_steps=args.num_steps, train_categories=None, num_leaps=2,
                            colour_diversity=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, scorer, settings, tmp)
        fresh: LabelledPool | None = None
        for k in range(max(1, args.align_steps // args.snapshot_every)):
            train_and_track(trainer, settings, None, desc=f"round {r + 1}: align", show_progress=True)
            model.eval()
            snap = model_samples(model, args.samples, settings.num_steps, seed=args.seed + 10_000 * (r + 1) + 100 * k)
            model.train()
            fresh = snap if fresh is None else fresh + snap
    return fresh


def _save(scorer: torch.nn.Module, args: argparse.Namespace, argv: list[str] | None, log: list[dict],
          hard: LabelledPool | None, start: float) -> Path:
    """Save the hardened scorer with the base scorer's meta plus this run's (``meta.harden``) and its held-out ranking."""
    rank = ranking_accuracy(scorer)
    base_meta = json.loads(shapes_scorer_files(args.scorer)[1].read_text()).get("meta", {})
    meta = base_meta | {
        "harden": {
            "command": "python -m leapalign.shapes.harden " + shlex.join(sys.argv[1:] if argv is None else argv),
            "rounds": log,
            "hard_samples": len(hard) if hard is not None else 0,
            "minutes": round((time.time() - start) / 60, 2),
            "previous": base_meta.get("harden"),  # an earlier harden run this one continued from
        },
        "held_out_ranking": {k: round(v, 4) for k, v in rank.items()},
    }
    path = save_shapes_scorer(scorer, args.out, meta=meta)
    print(f"held-out ranking: {rank}\nwrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())

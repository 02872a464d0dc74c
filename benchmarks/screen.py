"""Screens of the shapes demo (issue 16): ``leapalign demo`` with one change its own flags do not offer.

    python -m benchmarks screen [--objective NAME] [--set KEY=VALUE ...] [--ensemble SCORER ...] -- DEMO ARGS

- ``--objective drtune``: another objective the study runs, at the demo's settings (not its wall-clock budget);
- ``--set tau=0.02``: override a field of the objective's config (LeapAlign's trajectory-weight floor, say);
- ``--ensemble S1 S2 S3``: reward and eval score are the mean probability of several scorers (a reward-model
  ensemble, the usual guard against over-optimising one proxy).

Everything else -- settings, eval sets, outputs, ``summary.json`` -- is the demo's, and the summary records this
command. What was screened and what it gave: ``benchmarks/results/demo_shapes/README.md``.
"""
from __future__ import annotations

import argparse
import ast
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["build_parser", "main", "scorer_ensemble", "trainer_factory"]


def scorer_ensemble(scorers: Sequence[Any]) -> Any:
    """The mean probability of several scorers, as the library's :class:`CompositeReward` with equal weights (for two
    scorers, 0.5 r1 + 0.5 r2 is bit for bit the mean the fourth pass's runs used)."""
    from leapalign.rewards.composite import CompositeReward, RewardTerm

    return CompositeReward([RewardTerm(f"scorer{i}", s, 1.0 / len(scorers)) for i, s in enumerate(scorers)])


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string setting


def build_parser() -> argparse.ArgumentParser:
    from leapalign.objectives import OBJECTIVES

    p = argparse.ArgumentParser(prog="python -m benchmarks screen", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--objective NAME] [--set KEY=VALUE ...] [--ensemble SCORER ...] -- [DEMO ARGS]",
                                epilog="Arguments after -- go to `leapalign demo` (see `leapalign demo --help`).")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="leapalign", help="objective to train with (default leapalign)")
    p.add_argument("--set", dest="overrides", type=_key_value, nargs="+", default=[], metavar="KEY=VALUE",
                   help="objective config overrides, e.g. tau=0.02")
    p.add_argument("--ensemble", type=Path, nargs="+", default=None, metavar="SCORER",
                   help="two or more scorer checkpoints whose mean probability is the reward (replaces --scorer)")
    return p


def trainer_factory(objective_name: str, overrides: dict[str, Any]) -> Callable[..., Any]:
    """The demo's :func:`make_trainer` with another objective and config overrides."""
    from leapalign.shapes.experiment import make_trainer, objective_kwargs

    def screened_trainer(model: Any, scorer: Any, settings: Any, output_dir: Any) -> Any:
        objective = objective_kwargs(settings, objective_name) | overrides
        return make_trainer(model, scorer, settings, output_dir, objective_name, objective)

    return screened_trainer


def main(argv: Sequence[str] | None = None) -> int:
    from leapalign.shapes import demo

    argv = list(argv or [])
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    demo_argv = argv[split + 1:]
    if args.ensemble is not None and len(args.ensemble) < 2:
        parser.error("--ensemble needs two or more scorers")
    if args.ensemble is not None and any(a == "--scorer" or a.startswith("--scorer=") for a in demo_argv):
        parser.error("--ensemble replaces the demo's --scorer; give one or the other")
    if args.ensemble is not None and any(a in ("log_score", "--reward=log_score") for a in demo_argv):
        parser.error("--ensemble is a mean of probabilities; it has no logits for the demo's --reward log_score")
    overrides = dict(args.overrides)
    try:  # a bad key or value is refused now, not after the demo's first evaluation
        from leapalign.objectives import build_objective
        from leapalign.shapes.experiment import DemoSettings, objective_kwargs

        build_objective(args.objective, **(objective_kwargs(DemoSettings(), args.objective) | overrides))
    except (TypeError, ValueError) as exc:
        parser.error(f"--set: {exc}")
    scorer = None
    if args.ensemble is not None:
        from leapalign.shapes.scorer import load_shapes_scorer

        try:
            scorer = scorer_ensemble([load_shapes_scorer(path) for path in args.ensemble])
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
    command = "python -m benchmarks screen " + shlex.join(argv[:split]) + " --"
    factory = trainer_factory(args.objective, overrides)
    return demo.main(demo_argv, demo.DemoHooks(make_trainer=factory, scorer=scorer, command=command))

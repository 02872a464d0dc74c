"""Command-line options shared by the suites, and where results go.

``benchmarks/`` is a folder of the repository, run from its root as ``python -m benchmarks`` and never
installed: results go to ``benchmarks/results/`` of this checkout (resolved from this file, not
from the working directory) unless ``--json``/``--md`` (or ``--out`` for ``gpu`` and ``study``) say
otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from benchmarks.workload import DEFAULT_METHODS, METHODS, WorkloadConfig

__all__ = ["REPO_ROOT", "RESULTS_DIR", "suite_parser", "parse_suite_args", "add_workload_args", "add_output_args",
           "output_paths", "workload_config", "default_paths"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
DEFAULT_STEPS = (4, 8, 16, 25, 50)


def suite_parser(suite: str, doc: str, threads: bool = True, threads_default: int | None = None) -> argparse.ArgumentParser:
    """The parser a suite starts from: ``python -m benchmarks SUITE``, its docstring's first line and
    (``threads``) ``--threads``, which :func:`parse_suite_args` applies before anything is measured."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {suite}", description=doc.strip().split("\n")[0])
    if threads:
        parser.add_argument("--threads", type=int, default=threads_default,
                            help="torch.set_num_threads before measuring (0 or unset: torch's choice; recorded in the machine block)")
    return parser


def parse_suite_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``(args, argv)``: ``argv`` (default: this process's arguments) parsed, ``--threads`` applied if given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return args, argv


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Model, device, dtype, batch, seed, methods, T values and output paths (``--threads`` comes with :func:`suite_parser`)."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the iteration runs")
    parser.add_argument("--model", default="cpu-bench",
                        help="tiny_flux config name (cpu-bench, test) or flux-dev (FLUX.1-dev architecture, random weights)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (default: full weights)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="sampling steps T to sweep")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"methods to run (default: the issue's seven); known: {', '.join(METHODS)}; or 'all'")
    add_output_args(parser, "SUITE_DEVICE[_MODEL].json")


def add_output_args(parser: argparse.ArgumentParser, default_name: str) -> None:
    """``--json`` (default ``benchmarks/results/<default_name>``) and ``--md`` (default: the JSON path with .md)."""
    parser.add_argument("--json", default=None, help=f"result JSON path (default: benchmarks/results/{default_name})")
    parser.add_argument("--md", default=None, help="Markdown path (default: the JSON path with .md)")


def output_paths(args: argparse.Namespace, default_name: str) -> tuple[str, str]:
    """``(json_path, md_path)``: explicit ``--json``/``--md`` win; otherwise ``RESULTS_DIR/default_name``."""
    json_path = args.json or os.path.join(RESULTS_DIR, default_name)
    return json_path, args.md or os.path.splitext(json_path)[0] + ".md"


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    """Validate the shared flags and freeze them into a :class:`WorkloadConfig`."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    bad = [t for t in args.steps if t < 2]
    if bad:
        raise ValueError(f"--steps must all be >= 2 (LeapAlign needs two distinct steps), got {bad}")
    return WorkloadConfig(model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          seed=args.seed, lora_rank=args.lora_rank)


def default_paths(suite: str, args: argparse.Namespace) -> tuple[str, str]:
    """``(json_path, md_path)``: explicit flags win; otherwise ``results/SUITE_DEVICE[_MODEL].json``."""
    suffix = args.device if args.model == "cpu-bench" else f"{args.device}_{args.model}"
    return output_paths(args, f"{suite}_{suffix}.json")

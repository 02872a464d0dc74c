"""The ``leapalign`` command: ``train``, ``sample``, ``plan``, ``demo``, ``pretrain-toy``, ``--version``.

Every user error (bad paths, empty or malformed prompt files, unknown reward or objective names,
wrong types, unsupported devices, a model of an unsupported family or one its adapter cannot serve, an output folder that is a file, not writable or held by another
run, a reward without a gradient) is reported on stderr as one line and exits with code 2; all but
the last are found *before anything is written or a model is loaded* (see
:mod:`leapalign.training.preflight`). A run that fails later exits with 1.

The benchmarks are not part of the installed package: run them from a checkout of the repository
with ``python -m benchmarks``.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

__all__ = ["main", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_USAGE = 2
EXIT_FAILURE = 1

_USAGE = """usage: leapalign COMMAND [ARGS]

commands:
  train CONFIG.yaml [--key value ...]   post-train FLUX.1, FLUX.2 or SD3 with LeapAlign (the family is read from
                                         model_path's model_index.json; leapalign train --help lists the keys)
  sample --model_path DIR [--checkpoint CKPT] --prompt TEXT --output OUT.png
  plan CONFIG.yaml [--key value ...] [--gpu NAME] [--world-size N] [--json PATH]
                                         memory per GPU, FLOPs and roofline time of a config on the
                                         real architecture, on fake tensors (no GPU, no weights)
  demo [ARGS]                            the embedded shapes-world demo (CPU, minutes)
  pretrain-toy [ARGS]                    pretrain the shapes-world toy model
  --version                              print the version

benchmarks run from a checkout of the repository: python -m benchmarks --help
"""

# Commands served by other modules' ``main(argv)``, imported only when asked for. The shapes world
# sits above the command line in the layers: it is named here as a string, never imported.
_DISPATCH = {
    "plan": ("leapalign.training.plan", "main"),
    "demo": ("leapalign.shapes.demo", "main"),
    "pretrain-toy": ("leapalign.shapes.pretrain", "main"),
}


class UsageError(Exception):
    """A problem with what the user asked for (reported without a traceback, exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("--version", "-V", "version"):
        from leapalign import __version__

        print(f"leapalign {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return _train(rest)
        if command == "sample":
            return _sample(rest)
        if command in _DISPATCH:
            return _dispatch(command, rest)
        raise UsageError(f"unknown command {command!r}; expected one of train, sample, {', '.join(_DISPATCH)} "
                         "(benchmarks: python -m benchmarks from the repository)")
    except UsageError as exc:
        print(f"leapalign {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _dispatch(command: str, argv: list[str]) -> int:
    module_name, attr = _DISPATCH[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"'{command}' is not available in this installation ({module_name} is missing)") from exc
        raise
    entry = getattr(module, attr, None)
    if entry is None:
        raise UsageError(f"'{command}': {module_name} has no {attr}(argv) entry point")
    code = entry(argv)
    return int(code or 0)


def _train_help() -> str:
    from leapalign.training.config import LeapAlignConfig

    lines = ["usage: leapalign train CONFIG.(yaml|toml) [--key value ...]", "", "config keys (defaults in brackets):"]
    for name, default, text in LeapAlignConfig.field_help():
        lines.append(f"  --{name} [{default}]\n      {text}")
    lines.append("  --objective.KEY VALUE sets one objective option (num_steps, alpha, tau, hinge_lambda, ...)")
    lines.append("  --resume latest is --ckpt_resume_from latest; a bare --overwrite (or any bool key) means true")
    return "\n".join(lines) + "\n"


def _train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_train_help(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    from leapalign.training.errors import ConfigError, NonFiniteLossError
    from leapalign.training.preflight import prepare_run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run = prepare_run(argv[0], argv[1:])
    except ConfigError as exc:  # found before anything is written or loaded
        raise UsageError(" ".join(str(exc).split())) from exc
    from leapalign.training.trainer import LeapAlignTrainer

    try:
        trainer = LeapAlignTrainer(run.config, run.load_pipeline(), reward=run.reward, objective=run.objective)
        result = trainer.train()
    except ConfigError as exc:  # a checkpoint that cannot be trusted, a reward that drops its gradient
        raise UsageError(" ".join(str(exc).split())) from exc
    except NonFiniteLossError as exc:
        print(f"leapalign train: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"leapalign train: done at step {result.step} ({result.skipped_steps} skipped); checkpoint: {result.checkpoint}", file=sys.stderr)
    return 0


def _sample(argv: list[str]) -> int:
    from leapalign.prompts import PromptFileError
    from leapalign.sampling import main as sample_main

    try:
        return sample_main(argv)
    except (ValueError, FileNotFoundError, PromptFileError) as exc:
        raise UsageError(str(exc)) from exc
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)

"""The ``leapalign`` command: ``train``, ``sample``, ``demo``, ``pretrain-toy``, ``bench``.

Every user error (bad paths, empty or malformed prompt files, unknown reward or objective names,
unsupported devices, invalid config values) is reported on stderr as one line and exits with
code 2 *before anything is written*: the config, prompts, reward names, model path and device are
all checked before the output directory is created. A run that fails later exits with 1.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_USAGE = 2
EXIT_FAILURE = 1

_USAGE = """usage: leapalign COMMAND [ARGS]

commands:
  train CONFIG.yaml [--key value ...]   post-train with LeapAlign (leapalign train --help lists the keys)
  sample --model_path DIR [--checkpoint CKPT] --prompt TEXT --output OUT.png
  demo [ARGS]                            the embedded shapes-world demo (CPU, minutes)
  pretrain-toy [ARGS]                    pretrain the shapes-world toy model
  bench [ARGS]                           benchmarks (memory, throughput, kernels)
"""

# Commands served by other packages' ``main(argv)``, imported only when asked for.
_DISPATCH = {
    "demo": ("leapalign.shapes.demo", "main"),
    "pretrain-toy": ("leapalign.shapes.pretrain", "main"),
    "bench": ("benchmarks.__main__", "main"),
}


class UsageError(Exception):
    """A problem with what the user asked for (reported without a traceback, exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return _train(rest)
        if command == "sample":
            return _sample(rest)
        if command in _DISPATCH:
            return _dispatch(command, rest)
        raise UsageError(f"unknown command {command!r}; expected one of train, sample, {', '.join(_DISPATCH)}")
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
    from leapalign.config import LeapAlignConfig

    lines = ["usage: leapalign train CONFIG.(yaml|toml) [--key value ...]", "", "config keys (defaults in brackets):"]
    for name, default, text in LeapAlignConfig.field_help():
        lines.append(f"  --{name} [{default}]\n      {text}")
    lines.append("  --objective.KEY VALUE sets one objective option (num_steps, alpha, tau, hinge_lambda, ...)")
    return "\n".join(lines) + "\n"


def _train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_train_help(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    config, pipe_loader = _prepare_train(argv[0], argv[1:])
    from leapalign.checkpoint import CheckpointError
    from leapalign.config import ConfigError
    from leapalign.trainer import LeapAlignTrainer, NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer = LeapAlignTrainer(config, pipe_loader())
        result = trainer.train()
    except (ConfigError, CheckpointError) as exc:  # raised before the first file is written
        raise UsageError(str(exc)) from exc
    except NonFiniteLossError as exc:
        print(f"leapalign train: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"leapalign train: done at step {result.step} ({result.skipped_steps} skipped); checkpoint: {result.checkpoint}", file=sys.stderr)
    return 0


def _prepare_train(config_path: str, overrides: list[str]):
    """Everything that can be checked without loading the model, checked; returns (config, loader)."""
    import torch

    from leapalign.config import ConfigError, LeapAlignConfig
    from leapalign.prompts import PromptFileError, load_prompts

    try:
        config = LeapAlignConfig.from_file(config_path, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    try:
        if config.prompt_file:
            load_prompts(config.prompt_file)
        elif not config.prompts:
            raise UsageError("no prompts: set prompt_file or prompts in the config")
    except PromptFileError as exc:
        raise UsageError(str(exc)) from exc
    if not config.reward_specs:
        raise UsageError("reward_specs is empty: name at least one reward (e.g. [{name: pickscore, path: /models/pickscore}])")
    for spec in config.reward_specs:  # names and the objective were checked by the config itself
        if spec.path is not None and not Path(spec.path).exists():
            raise UsageError(f"reward {spec.name!r}: path={spec.path!r} does not exist")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={config.device!r} but no CUDA device is available; use device=cpu or auto")
    if not config.model_path:
        raise UsageError("model_path is empty: point it at a local FluxPipeline directory (FLUX.1-dev layout)")
    model_dir = Path(config.model_path)
    if not (model_dir / "model_index.json").is_file():
        raise UsageError(f"model_path={config.model_path!r} is not a diffusers pipeline directory (no model_index.json)")
    if config.ckpt_resume_from not in (None, "latest") and not (Path(config.ckpt_resume_from) / "trainer_state.json").is_file():
        raise UsageError(f"ckpt_resume_from={config.ckpt_resume_from!r} is not a checkpoint directory")

    def load():
        from diffusers import FluxPipeline

        from leapalign.trainer import torch_dtype

        return FluxPipeline.from_pretrained(str(model_dir), torch_dtype=torch_dtype(config.model_dtype))

    return config, load


def _sample(argv: list[str]) -> int:
    from leapalign.prompts import PromptFileError
    from leapalign.sampling import main as sample_main

    try:
        return sample_main(argv)
    except (ValueError, FileNotFoundError, PromptFileError) as exc:
        raise UsageError(str(exc)) from exc
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)

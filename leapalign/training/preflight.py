"""Everything ``leapalign train`` checks before it loads a model or writes a file.

The config (types and ranges, the objective's own config), the prompts, the device, the model
folder (a diffusers pipeline of a supported family -- FLUX.1, FLUX.2, SD3 -- read from its
``model_index.json``; for FLUX.2 the text encoder's config must fit the transformer), the resume
checkpoint, the output folder (creatable, writable, not a file, not held by
another run) and the rewards -- imported, constructed, and given one random image to prove they
pass a gradient back -- in that order, cheapest first. Any failure is a :class:`ConfigError`
(one line, exit code 2) and leaves the disk untouched. The folder is claimed (locked) by
:meth:`LeapAlignTrainer.train`; the check here only looks, so a run that would be refused there is
refused here first, before the model loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from leapalign.adapters.families import ModelFolder, UnsupportedModelError, read_model_folder
from leapalign.dtypes import torch_dtype
from leapalign.prompts import PromptFileError, load_prompts
from leapalign.rewards.base import RewardNotDifferentiableError, call_reward
from leapalign.training import wiring
from leapalign.training.config import LeapAlignConfig
from leapalign.training.errors import ConfigError, RewardGradientError
from leapalign.training.run_dir import check_claimable

__all__ = ["PreparedRun", "prepare_run", "resolve_device", "model_folder"]


@dataclass
class PreparedRun:
    """A checked config, its reward and objective (built once, here), and how to load the model."""

    config: LeapAlignConfig
    reward: Any
    objective: Any
    load_pipeline: Callable[[], Any]
    family: str = "flux"


def resolve_device(device: str) -> torch.device:
    """The device accelerate will pick for ``device`` on this process (``auto``: CUDA when present)."""
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if device == "cuda":
                raise ConfigError(f"device={device!r} but no CUDA device is available; use device=cpu or auto")
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        index = int(device.split(":")[1])
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but {torch.cuda.device_count()} CUDA device(s) are available")
        return torch.device(device)
    return torch.device("cpu")


def _check_inputs(config: LeapAlignConfig) -> None:
    if config.prompt_file:
        try:
            load_prompts(config.prompt_file)
        except PromptFileError as exc:
            raise ConfigError(str(exc)) from None
    elif not config.prompts:
        raise ConfigError("no prompts: set prompt_file or prompts in the config")
    if not config.reward_specs:
        raise ConfigError("reward_specs is empty: name at least one reward (e.g. [{name: pickscore, path: /models/pickscore}])")
    for spec in config.reward_specs:
        if spec.path is not None and not Path(spec.path).exists():
            raise ConfigError(f"reward {spec.name!r}: path={spec.path!r} does not exist")
    if not config.model_path:
        raise ConfigError("model_path is empty: point it at a local diffusers pipeline directory (FLUX.1, FLUX.2 or SD3)")
    if not (Path(config.model_path) / "model_index.json").is_file():
        raise ConfigError(f"model_path={config.model_path!r} is not a diffusers pipeline directory (no model_index.json)")
    if config.ckpt_resume_from not in (None, "latest") and not (Path(config.ckpt_resume_from) / "trainer_state.json").is_file():
        raise ConfigError(f"ckpt_resume_from={config.ckpt_resume_from!r} is not a checkpoint directory")


def model_folder(config: LeapAlignConfig) -> ModelFolder:
    """The family and pipeline class of ``config.model_path``, and for FLUX.2 the check that its text
    encoder's hidden states fit the transformer -- from config files, before any weight loads."""
    try:
        folder = read_model_folder(config.model_path)
        if folder.family.name == "flux2":
            _check_flux2_text_encoder(folder)
    except (UnsupportedModelError, ValueError, OSError) as exc:
        raise ConfigError(f"model_path={config.model_path!r}: {' '.join(str(exc).split())}") from None
    return folder


def _check_flux2_text_encoder(folder: ModelFolder) -> None:
    from transformers import AutoConfig

    from leapalign.adapters.flux2 import DEFAULT_TEXT_LAYERS, check_text_layout

    transformer = json.loads((folder.path / "transformer" / "config.json").read_text(encoding="utf-8"))
    encoder_dir = folder.path / "text_encoder"
    if not (encoder_dir / "config.json").is_file():
        raise ValueError(f"{folder.pipeline} has no text_encoder/config.json (the trainer encodes prompts with it)")
    check_text_layout(AutoConfig.from_pretrained(str(encoder_dir)), DEFAULT_TEXT_LAYERS[folder.pipeline],
                      transformer["joint_attention_dim"], folder.pipeline)


def check_reward_gradient(reward: Any, config: LeapAlignConfig, prompts: Sequence[str], device: torch.device) -> None:
    """One random image through ``reward`` (``call_reward``'s contract): the score must carry a gradient
    back to the image."""
    images = torch.rand(1, 3, config.model_height, config.model_width, device=device, requires_grad=True)
    try:
        call_reward(reward, images, list(prompts[:1]))
    except (RewardNotDifferentiableError, TypeError, ValueError) as exc:
        names = ", ".join(s.name for s in config.reward_specs)
        raise RewardGradientError(f"reward_specs ({names}): {exc}") from None


def prepare_run(config_path: str, overrides: Sequence[str], main_process: bool | None = None) -> PreparedRun:
    """Check everything and build the reward and the objective; nothing is written."""
    config = LeapAlignConfig.from_file(config_path, overrides)
    _check_inputs(config)
    folder = model_folder(config)
    device = resolve_device(config.device)
    main = int(os.environ.get("RANK", "0")) == 0 if main_process is None else main_process
    if main:
        check_claimable(config.output_dir, config.ckpt_resume_from, config.overwrite)
    reward = wiring.build_reward(config, device)
    prompts = load_prompts(config.prompt_file) if config.prompt_file else config.prompts
    check_reward_gradient(reward, config, prompts, device)
    objective = wiring.build_objective(config, reward)

    def load_pipeline():
        import diffusers

        pipeline_class = getattr(diffusers, str(folder.pipeline))
        return pipeline_class.from_pretrained(str(config.model_path), torch_dtype=torch_dtype(config.model_dtype, "model_dtype"))

    return PreparedRun(config, reward, objective, load_pipeline, folder.family.name)

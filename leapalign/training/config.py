"""Training configuration: one dataclass, loaded from YAML/TOML, overridden from the command line.

Fields are grouped by prefix, TRL style: ``model_*`` (what to load), ``prompt_*`` (what to train
on), ``objective*`` (the loss; the nested ``objective`` mapping configures the objective's own
config class), ``reward_*``, ``train_*`` (optimiser, schedule, EMA, faults, scale-out), ``lora_*``,
``sample_*`` (evaluation grids) and ``ckpt_*``. Every field has ``help`` metadata; the same
dataclass builds ``leapalign train --help``. Types are checked and converted by pydantic
(:mod:`leapalign.training.fields`), ranges in ``_validate``; every error names the field, what was
given and what was expected, so a bad config fails before any model is loaded or file written.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

import torch

from leapalign.dtypes import torch_dtype
from leapalign.rollout_engine import COMPILE_MODES, CUDA_GRAPH_MODES, GRAD_STEP_PATHS, RolloutEngineConfig
from leapalign.training.errors import ConfigError
from leapalign.training.fields import close_matches, validate_fields

__all__ = ["ConfigError", "RewardSpec", "LeapAlignConfig", "FLUX_LORA_TARGET_MODULES", "load_config_mapping",
           "apply_overrides", "objective_class"]

#: The attention and projection layers diffusers' own Flux LoRA scripts target
#: (``examples/dreambooth/train_dreambooth_lora_flux.py``); ``load_lora_weights`` reads them back.
FLUX_LORA_TARGET_MODULES: list[str] = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]

#: ``rollout_compile=auto`` compiles runs of at least this many iterations (optimiser steps x
#: micro-batches) per device type. CPU: measured on cpu-bench, one thread, T = 25 (``python -m
#: benchmarks throughput``): a cold compile of 45 s against 0.073 s saved per LeapAlign iteration
#: pays back after ~620 iterations (a warm inductor cache: ~13 s, ~180). CUDA: not measured yet
#: (no GPU lent); CUDA graphs remove the launch overhead that dominates small batches there.
AUTO_COMPILE_MIN_ITERATIONS = {"cpu": 1000, "cuda": 100}

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: Command-line spellings that mean a field.
_ALIASES = {"resume": "ckpt_resume_from"}


def _help(text: str, **kw: Any) -> dict[str, Any]:
    return {"metadata": {"help": text}, **kw}


@dataclass
class RewardSpec:
    """One reward term: ``name`` from the registry (``clip``, ``pickscore``, ``hps``, ``brightness``...)
    or ``"module:attribute"`` for a user callable; ``path`` is its local checkpoint; the term adds
    ``weight * min(r, hinge)`` to the reward the objective sees (``hinge=None``: no cap)."""

    name: str
    path: str | None = None
    weight: float = 1.0
    hinge: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LeapAlignConfig:
    """Everything ``leapalign train`` needs. Defaults follow the paper where it states one."""

    # ---- run ---------------------------------------------------------------------------------
    output_dir: str = field(default="leapalign_out", **_help("Where checkpoints, sample grids, metrics.jsonl and config.yaml go."))
    seed: int = field(default=0, **_help("Seed of every random draw (noise, leap pair, prompt order)."))
    device: str = field(default="auto", **_help("auto | cpu | cuda | cuda:N. 'auto' lets accelerate pick (CUDA when present)."))
    mixed_precision: str = field(default="no", **_help("no | bf16: accelerate autocast for the rollout and the reward."))
    log_with: list[str] = field(default_factory=list, **_help("accelerate trackers (tensorboard, wandb...); metrics.jsonl is always written."))
    log_every: int = field(default=1, **_help("Log metrics every N optimiser steps."))
    tracker_project_name: str = field(default="leapalign", **_help("Project name given to the trackers."))
    overwrite: bool = field(default=False, **_help("output_dir holds another run: move it aside (renamed with a timestamp, never deleted) and start fresh. Without it such a run is refused unless resumed (ckpt_resume_from=latest)."))

    # ---- model ---------------------------------------------------------------------------------
    model_path: str = field(default="", **_help("Local diffusers FluxPipeline directory (FLUX.1-dev layout). Needed by the CLI."))
    model_dtype: str = field(default="bfloat16", **_help("dtype the frozen weights are loaded in: float32 | bfloat16 | float16."))
    model_height: int = field(default=512, **_help("Training image height in pixels."))
    model_width: int = field(default=512, **_help("Training image width in pixels."))
    model_guidance: float | None = field(default=None, **_help(
        "Guidance: FLUX.1's distilled guidance, FLUX.2's embedded guidance or SD3's classifier-free scale; "
        "null = the family pipeline's default guidance_scale (FLUX.1 3.5, FLUX.2 4.0, SD3 7.0)."))
    model_max_sequence_length: int = field(default=512, **_help("T5 prompt length for the Flux prompt encoder."))
    model_gradient_checkpointing: bool = field(default=False, **_help("Checkpoint the transformer blocks (diffusers' enable_gradient_checkpointing)."))
    model_use_leapkernels: bool | None = field(default=None, **_help("Patch the Flux transformer with leapkernels' fused ops (apply_leapkernels_to_flux): true, false, or null = auto (patch when the network is a diffusers Flux transformer); the objective's own fused ops are objective.use_kernels."))
    model_vae_gradient_checkpointing: bool = field(default=True, **_help("Checkpoint the VAE decoder in the reward path."))

    # ---- rollout engine --------------------------------------------------------------------------------
    rollout_compile: str = field(default="auto", **_help("auto | off | default | max-autotune: run the no-grad rollout steps through torch.compile (inductor). auto = default where the compile time (tens of seconds, once) pays back: a transformer adapter, no FSDP, and at least 100 iterations (steps x accumulation) on CUDA or 1000 on CPU; off runs everything eagerly."))
    rollout_cuda_graphs: str = field(default="auto", **_help("auto | on | off: CUDA graphs for the compiled rollout (auto: on for CUDA, off on CPU)."))
    rollout_grad_steps: str = field(default="eager", **_help("eager | compiled: the path of the grad-enabled steps (eager keeps leapkernels' memory savings)."))

    # ---- prompts ---------------------------------------------------------------------------------
    prompt_file: str | None = field(default=None, **_help("Prompts: .txt (one per line), .json (list of strings) or .jsonl ({'prompt': ...})."))
    prompts: list[str] = field(default_factory=list, **_help("Inline prompts (used when prompt_file is not set)."))

    # ---- objective -------------------------------------------------------------------------------
    objective_name: str = field(default="leapalign", **_help("Objective from leapalign.objectives (leapalign, draft_k, refl, full_backprop...)."))
    objective: dict[str, Any] = field(default_factory=dict, **_help("Keyword arguments of the objective's config (num_steps, alpha, tau, ...). Override one with --objective.KEY VALUE."))

    # ---- rewards ---------------------------------------------------------------------------------
    reward_specs: list[RewardSpec] = field(default_factory=list, **_help("Reward terms: list of {name, path, weight, hinge, kwargs}."))
    reward_dtype: str = field(default="float32", **_help("dtype reward models are loaded in."))
    reward_gradient_checkpointing: bool = field(default=False, **_help("Checkpoint the reward model's layers (transformers gradient_checkpointing_enable)."))

    # ---- training --------------------------------------------------------------------------------
    train_mode: str = field(default="lora", **_help("lora | full: peft LoRA on the transformer, or full fine-tune."))
    train_num_steps: int = field(default=300, **_help("Optimiser steps (paper: 300)."))
    train_batch_size: int = field(default=1, **_help("Prompts per micro-batch per process."))
    train_gradient_accumulation_steps: int = field(default=1, **_help("Micro-batches per optimiser step; global batch = batch x accumulation x processes."))
    train_learning_rate: float = field(default=1e-5, **_help("AdamW learning rate (paper: 1e-5)."))
    train_weight_decay: float = field(default=1e-4, **_help("AdamW weight decay (paper: 1e-4)."))
    train_adam_beta1: float = field(default=0.9, **_help("AdamW beta1."))
    train_adam_beta2: float = field(default=0.999, **_help("AdamW beta2."))
    train_adam_epsilon: float = field(default=1e-8, **_help("AdamW epsilon."))
    train_max_grad_norm: float = field(default=1.0, **_help("Clip the global gradient norm to this; 0 disables clipping."))
    train_lr_scheduler: str = field(default="constant_with_warmup", **_help("diffusers.optimization.get_scheduler name."))
    train_lr_warmup_steps: int = field(default=0, **_help("Warm-up steps of the LR schedule."))
    train_ema_decay: float = field(default=0.995, **_help("EMA decay of the trainable weights (paper: 0.995); 0 disables EMA."))
    train_max_nonfinite_steps: int = field(default=5, **_help("Stop with an error after this many NaN/Inf steps in a row (each is skipped)."))
    train_distributed: str = field(default="auto", **_help("auto | none | ddp | fsdp. auto: fsdp under an accelerate FSDP config, ddp when >1 process."))
    train_trainable_dtype: str = field(default="float32", **_help("dtype of the trainable weights and of the EMA (master weights)."))

    # ---- LoRA ------------------------------------------------------------------------------------
    lora_rank: int = field(default=16, **_help("LoRA rank (train_mode=lora)."))
    lora_alpha: float | None = field(default=None, **_help("LoRA alpha; default = rank (scale 1)."))
    lora_dropout: float = field(default=0.0, **_help("LoRA dropout."))
    lora_target_modules: list[str] = field(default_factory=lambda: list(FLUX_LORA_TARGET_MODULES), **_help("Module names LoRA wraps (diffusers' Flux targets by default)."))

    # ---- evaluation samples ------------------------------------------------------------------------
    sample_every: int = field(default=0, **_help("Save a PNG sample grid every N steps (and at the end); 0 disables."))
    sample_num_images: int = field(default=4, **_help("Images per grid (first prompts of sample_prompts or of the prompt source)."))
    sample_num_steps: int = field(default=28, **_help("Euler steps of the evaluation sampler."))
    sample_prompts: list[str] = field(default_factory=list, **_help("Prompts of the evaluation grid (default: the first training prompts)."))
    sample_use_ema: bool = field(default=True, **_help("Sample with the EMA weights when EMA is on."))

    # ---- checkpoints -----------------------------------------------------------------------------
    ckpt_every: int = field(default=100, **_help("Save a resumable checkpoint every N steps; 0: only at the end."))
    ckpt_keep_last: int = field(default=2, **_help("Keep this many most recent checkpoints (0 keeps all)."))
    ckpt_resume_from: str | None = field(default=None, **_help("'latest' (in output_dir; a fresh start when there is none yet) or a checkpoint directory to resume from. --resume is the same."))
    ckpt_save_final: bool = field(default=True, **_help("Save a checkpoint after the last step."))

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in validate_fields(type(self), values).items():
            setattr(self, name, value)
        self._validate()

    # ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")

        need(bool(_DEVICE_RE.match(self.device)), "device", "auto, cpu, cuda or cuda:N")
        need(self.mixed_precision in ("no", "bf16"), "mixed_precision", "'no' or 'bf16' (fp16 needs a grad scaler; use bf16)")
        need(self.log_every >= 1, "log_every", ">= 1")
        for name in ("model_dtype", "reward_dtype", "train_trainable_dtype"):
            try:
                torch_dtype(getattr(self, name), name)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        for name in ("model_height", "model_width"):
            need(getattr(self, name) >= 16 and getattr(self, name) % 16 == 0, name, "a positive multiple of 16 pixels")
        need(self.model_max_sequence_length >= 1, "model_max_sequence_length", ">= 1")
        self._validate_training()
        need(self.sample_every >= 0, "sample_every", ">= 0")
        need(self.sample_num_images >= 1, "sample_num_images", ">= 1")
        need(self.sample_num_steps >= 1, "sample_num_steps", ">= 1")
        need(self.rollout_compile in ("auto",) + COMPILE_MODES, "rollout_compile", f"one of {('auto',) + COMPILE_MODES}")
        need(self.rollout_cuda_graphs in CUDA_GRAPH_MODES, "rollout_cuda_graphs", f"one of {CUDA_GRAPH_MODES}")
        need(self.rollout_grad_steps in GRAD_STEP_PATHS, "rollout_grad_steps", f"one of {GRAD_STEP_PATHS}")
        need(self.ckpt_every >= 0, "ckpt_every", ">= 0")
        need(self.ckpt_keep_last >= 0, "ckpt_keep_last", ">= 0")
        need(bool(self.output_dir), "output_dir", "a directory path")
        for i, p in enumerate(self.prompts):
            if not p.strip():
                raise ConfigError(f"prompts[{i}] is empty; every prompt needs text")
        from leapalign.rewards.registry import UnknownRewardError, check_reward_name

        for i, spec in enumerate(self.reward_specs):
            try:
                check_reward_name(spec.name)
            except UnknownRewardError as exc:
                raise ConfigError(f"reward_specs[{i}].name: {exc}") from None
        self.objective_config()

    def _validate_training(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")

        need(self.train_mode in ("lora", "full"), "train_mode", "'lora' or 'full'")
        for name in ("train_num_steps", "train_batch_size", "train_gradient_accumulation_steps", "train_max_nonfinite_steps"):
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.train_learning_rate > 0, "train_learning_rate", "> 0")
        need(self.train_weight_decay >= 0, "train_weight_decay", ">= 0")
        need(0 <= self.train_adam_beta1 < 1, "train_adam_beta1", "in [0, 1)")
        need(0 <= self.train_adam_beta2 < 1, "train_adam_beta2", "in [0, 1)")
        need(self.train_adam_epsilon > 0, "train_adam_epsilon", "> 0")
        need(self.train_max_grad_norm >= 0, "train_max_grad_norm", ">= 0 (0 disables clipping)")
        need(self.train_lr_warmup_steps >= 0, "train_lr_warmup_steps", ">= 0")
        need(0 <= self.train_ema_decay < 1, "train_ema_decay", "in [0, 1) (0 disables EMA)")
        need(self.train_distributed in ("auto", "none", "ddp", "fsdp"), "train_distributed", "auto, none, ddp or fsdp")
        from diffusers.optimization import SchedulerType

        names = [s.value for s in SchedulerType]
        need(self.train_lr_scheduler in names, "train_lr_scheduler", f"one of {names}")
        if self.train_mode == "lora":
            need(self.lora_rank >= 1, "lora_rank", ">= 1 when train_mode='lora'")
            need(len(self.lora_target_modules) > 0, "lora_target_modules", "at least one module name")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 or null")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")

    def objective_config(self) -> Any:
        """The objective's own config (``LeapAlignObjectiveConfig``, a baseline's...), validated from
        ``objective``: types by pydantic, ranges by the config class itself."""
        cls = objective_class(self.objective_name)
        config_class = _objective_config_class(cls)
        kwargs = validate_fields(config_class, dict(self.objective), where="objective")
        try:
            return config_class(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"objective (objective_name={self.objective_name!r}): {exc}") from None

    def rollout_engine(self, model: Any, distributed: str = "none", device: Any = "cpu") -> RolloutEngineConfig:
        """The rollout engine for ``model`` trained under ``distributed`` on ``device``: ``rollout_compile``
        resolved (``auto``: compile a transformer adapter's rollout, without FSDP, on runs of at least
        `AUTO_COMPILE_MIN_ITERATIONS` iterations for the device type, where the compile time pays back)."""
        mode = self.rollout_compile
        if mode == "auto":
            iterations = self.train_num_steps * self.train_gradient_accumulation_steps
            needed = AUTO_COMPILE_MIN_ITERATIONS.get(torch.device(device).type)
            pays = needed is not None and iterations >= needed and distributed != "fsdp"
            compilable = isinstance(getattr(model, "transformer", None), torch.nn.Module)
            mode = "default" if pays and compilable else "off"
        return RolloutEngineConfig(mode, self.rollout_cuda_graphs, self.rollout_grad_steps)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeapAlignConfig":
        """Build from a mapping; an unknown key is an error that suggests the closest field."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of field -> value, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown config field {key!r}{close_matches(str(key), names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()) -> "LeapAlignConfig":
        """Load YAML (``.yaml``/``.yml``) or TOML (``.toml``), then apply ``--key value`` overrides."""
        return cls.from_dict(apply_overrides(load_config_mapping(path), overrides, cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_help(cls) -> list[tuple[str, str, str]]:
        """``(name, default, help)`` for every field: what ``leapalign train --help`` prints."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f.name, json.dumps(default), f.metadata.get("help", "")))
        return rows


def objective_class(name: str) -> type:
    """The objective class registered as ``name`` (``leapalign``, ``draft_k``...); ConfigError otherwise."""
    from leapalign.objectives import OBJECTIVES

    key = str(name).lower().replace("-", "_")
    if key not in OBJECTIVES:
        raise ConfigError(f"objective_name={name!r} is an unknown objective; expected one of {sorted(OBJECTIVES)}"
                          f"{close_matches(key, OBJECTIVES)}")
    return OBJECTIVES[key]


def _objective_config_class(cls: type) -> type:
    from leapalign.objectives import LeapAlignObjectiveConfig

    return getattr(cls, "config_class", None) or LeapAlignObjectiveConfig


def load_config_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict with a clear error for every failure mode."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .toml, got {suffix or 'no suffix'!r}")
    text = path.read_text()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: setup.py installs tomli there
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {_one_line(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type = LeapAlignConfig) -> dict[str, Any]:
    """Apply ``--key value`` / ``--key=value`` / ``--objective.alpha 0.3`` / a bare ``--flag`` (a bool
    field set true) to ``data``; values are parsed as YAML, types are checked later by the config."""
    data = dict(data)
    bools = {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    names = [f.name for f in dataclasses.fields(cls)]
    items, i = list(overrides), 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"expected an override of the form --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        top, dot, sub = key.partition(".")
        top = _ALIASES.get(top.replace("-", "_"), top.replace("-", "_"))
        if top not in names:
            raise ConfigError(f"unknown override --{key}{close_matches(top, names, prefix='--')}")
        if eq:
            i += 1
        elif top in bools and not dot and (i + 1 >= len(items) or items[i + 1].startswith("--")):
            raw, i = "true", i + 1
        elif i + 1 >= len(items):
            raise ConfigError(f"override --{key} needs a value")
        else:
            raw, i = items[i + 1], i + 2
        value = _yaml_value(raw)
        if dot:
            nested = data.get(top) or {}
            if not isinstance(nested, dict):
                raise ConfigError(f"--{key}: field {top!r} is not a mapping")
            data[top] = {**nested, sub: value}
        else:
            data[top] = value
    return data


def _yaml_value(raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())

"""Training configuration: one dataclass, loaded from YAML/TOML, overridden from the command line.

Fields are grouped by prefix, TRL style: ``model_*`` (what to load), ``prompt_*`` (what to train
on), ``objective*`` (the loss; the nested ``objective`` dict is passed to
:func:`leapalign.objectives.build_objective`), ``reward_*``, ``train_*`` (optimiser, schedule, EMA,
faults, scale-out), ``lora_*``, ``sample_*`` (evaluation grids) and ``ckpt_*``. Every field has
``help`` metadata; the same dataclass builds ``leapalign train --help``. Everything is validated in
``__post_init__`` with an error that names the field, what was given and what was expected, so a
bad config fails before any model is loaded or any file is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["ConfigError", "RewardSpec", "LeapAlignConfig", "FLUX_LORA_TARGET_MODULES"]

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

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range; the message names the field."""


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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"reward_specs[].name must be a non-empty string, got {self.name!r}")
        self.weight = _coerce("reward_specs[].weight", self.weight, float)
        if self.hinge is not None:
            self.hinge = _coerce("reward_specs[].hinge", self.hinge, float)
        if self.path is not None:
            self.path = str(self.path)
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"reward_specs[].kwargs must be a mapping, got {type(self.kwargs).__name__}")


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

    # ---- model ---------------------------------------------------------------------------------
    model_path: str = field(default="", **_help("Local diffusers FluxPipeline directory (FLUX.1-dev layout). Needed by the CLI."))
    model_dtype: str = field(default="bfloat16", **_help("dtype the frozen weights are loaded in: float32 | bfloat16 | float16."))
    model_height: int = field(default=512, **_help("Training image height in pixels."))
    model_width: int = field(default=512, **_help("Training image width in pixels."))
    model_guidance: float = field(default=3.5, **_help("Distilled guidance scale fed to the Flux transformer (FLUX.1-dev: 3.5)."))
    model_max_sequence_length: int = field(default=512, **_help("T5 prompt length for the Flux prompt encoder."))
    model_gradient_checkpointing: bool = field(default=False, **_help("Checkpoint the transformer blocks (diffusers' enable_gradient_checkpointing)."))
    model_use_leapkernels: bool | None = field(default=None, **_help("Patch the Flux transformer with leapkernels' fused ops (apply_leapkernels_to_flux): true, false, or null = auto (patch when the network is a diffusers Flux transformer); the objective's own fused ops are objective.use_kernels."))
    model_vae_gradient_checkpointing: bool = field(default=True, **_help("Checkpoint the VAE decoder in the reward path."))

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
    ckpt_resume_from: str | None = field(default=None, **_help("'latest' (in output_dir) or a checkpoint directory to resume from."))
    ckpt_save_final: bool = field(default=True, **_help("Save a checkpoint after the last step."))

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
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
            need(getattr(self, name) in _DTYPES, name, f"one of {sorted(_DTYPES)}")
        for name in ("model_height", "model_width"):
            need(getattr(self, name) >= 16 and getattr(self, name) % 16 == 0, name, "a positive multiple of 16 pixels")
        need(self.model_max_sequence_length >= 1, "model_max_sequence_length", ">= 1")
        need(self.train_mode in ("lora", "full"), "train_mode", "'lora' or 'full'")
        need(self.train_num_steps >= 1, "train_num_steps", ">= 1")
        need(self.train_batch_size >= 1, "train_batch_size", ">= 1")
        need(self.train_gradient_accumulation_steps >= 1, "train_gradient_accumulation_steps", ">= 1")
        need(self.train_learning_rate > 0, "train_learning_rate", "> 0")
        need(self.train_weight_decay >= 0, "train_weight_decay", ">= 0")
        need(0 <= self.train_adam_beta1 < 1, "train_adam_beta1", "in [0, 1)")
        need(0 <= self.train_adam_beta2 < 1, "train_adam_beta2", "in [0, 1)")
        need(self.train_adam_epsilon > 0, "train_adam_epsilon", "> 0")
        need(self.train_max_grad_norm >= 0, "train_max_grad_norm", ">= 0 (0 disables clipping)")
        need(self.train_lr_warmup_steps >= 0, "train_lr_warmup_steps", ">= 0")
        need(0 <= self.train_ema_decay < 1, "train_ema_decay", "in [0, 1) (0 disables EMA)")
        need(self.train_max_nonfinite_steps >= 1, "train_max_nonfinite_steps", ">= 1")
        need(self.train_distributed in ("auto", "none", "ddp", "fsdp"), "train_distributed", "auto, none, ddp or fsdp")
        from diffusers.optimization import SchedulerType

        names = [s.value for s in SchedulerType]
        need(self.train_lr_scheduler in names, "train_lr_scheduler", f"one of {names}")
        if self.train_mode == "lora":
            need(self.lora_rank >= 1, "lora_rank", ">= 1 when train_mode='lora'")
            need(len(self.lora_target_modules) > 0, "lora_target_modules", "at least one module name")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 or null")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        need(self.sample_every >= 0, "sample_every", ">= 0")
        need(self.sample_num_images >= 1, "sample_num_images", ">= 1")
        need(self.sample_num_steps >= 1, "sample_num_steps", ">= 1")
        need(self.ckpt_every >= 0, "ckpt_every", ">= 0")
        need(self.ckpt_keep_last >= 0, "ckpt_keep_last", ">= 0")
        need(bool(self.objective_name), "objective_name", "a non-empty objective name")
        for i, p in enumerate(self.prompts):
            if not p.strip():
                raise ConfigError(f"prompts[{i}] is empty; every prompt needs text")
        need(bool(self.output_dir), "output_dir", "a directory path")
        from leapalign.rewards.registry import UnknownRewardError, check_reward_name

        for i, spec in enumerate(self.reward_specs):
            try:
                check_reward_name(spec.name)
            except UnknownRewardError as exc:
                raise ConfigError(f"reward_specs[{i}].name: {exc}") from exc
        from leapalign.objectives import build_objective

        try:
            build_objective(self.objective_name, **self.objective)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"objective_name={self.objective_name!r} / objective={self.objective}: {exc}") from exc

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeapAlignConfig":
        """Build from a mapping; an unknown key is an error that suggests the closest field."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of field -> value, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown config field {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[str] = ()) -> "LeapAlignConfig":
        """Load YAML (``.yaml``/``.yml``) or TOML (``.toml``), then apply ``--key value`` overrides."""
        data = load_config_mapping(path)
        data = apply_overrides(data, overrides, cls)
        return cls.from_dict(data)

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
            rows.append((f.name, json.dumps(_jsonable(default)), f.metadata.get("help", "")))
        return rows


_DTYPES = {"float32", "bfloat16", "float16"}


def load_config_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict with a clear error for every failure mode."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ConfigError(f"reading {str(path)!r} needs Python >= 3.11 or `pip install tomli`; or use YAML") from None
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .toml, got {suffix or 'no suffix'!r}")
    except (yaml.YAMLError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type = LeapAlignConfig) -> dict[str, Any]:
    """Apply ``--key value`` / ``--key=value`` / ``--objective.alpha 0.3`` pairs (values parsed as YAML)."""
    data = dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    items = list(overrides)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"expected an override of the form --key value, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} needs a value")
            raw = items[i + 1]
            i += 2
        key = key.replace("-", "_") if key.replace("-", "_") in names or "." not in key else key
        top, _, sub = key.partition(".")
        if top not in names:
            close = difflib.get_close_matches(top, names, n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown override --{key}{hint}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if sub:
            nested = dict(data.get(top) or {})
            if not isinstance(nested, dict):
                raise ConfigError(f"--{key}: field {top!r} is not a mapping")
            nested[sub] = value
            data[top] = nested
        else:
            data[top] = value
    return data


# ---------------------------------------------------------------------------------------------
def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the annotated type; YAML gives '1e-5' as a string, ints for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last: ConfigError | None = None
        for a in non_none:
            try:
                return _coerce(name, value, a)
            except ConfigError as exc:
                last = exc
        if last is None:
            raise ConfigError(f"{name}={value!r} has the wrong type")
        raise ConfigError(f"{last} (or null)") if type(None) in args else last
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is invalid: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r} is invalid: expected a string")
    if origin is list:
        (inner,) = args
        if value is None:
            value = []
        elif isinstance(value, (str, dict, RewardSpec)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} is invalid: expected a list")
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is invalid: expected a mapping")
        return dict(value)
    if tp is RewardSpec:
        if isinstance(value, RewardSpec):
            return value
        if isinstance(value, str):
            return RewardSpec(name=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} is invalid: expected a mapping with name/path/weight/hinge")
        allowed = {f.name for f in dataclasses.fields(RewardSpec)}
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(f"{name} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "name" not in value:
            raise ConfigError(f"{name} needs a 'name' (a registered reward or 'module:attribute')")
        try:
            return RewardSpec(**value)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("reward_specs[]", name)) from exc
    if tp is Any:
        return value
    raise ConfigError(f"{name}: unsupported annotation {tp!r}")  # pragma: no cover - a bug in this file


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value

"""What a trainer is made of, built from the config: each function takes what it needs and returns
one part (gpt-fast style model surgery in small explicit functions).

- the ``accelerate.Accelerator`` (device, process group, bf16 autocast, trackers);
- the adapter (a ``FluxPipeline`` becomes a :class:`~leapalign.adapters.flux.FluxVelocityModel`),
  the prompt source and the prompt encoder;
- the reward (from ``reward_specs``) and the objective (built once, here, from the config's
  validated objective config and the reward's hinge);
- what trains: peft LoRA on the adapter's network (diffusers' Flux target modules) or a full
  fine-tune, trainable weights kept in ``train_trainable_dtype`` (fp32 master weights);
- leapkernels' fused Flux blocks, FSDP2 ``fully_shard`` per block then the root, the DDP start
  broadcast;
- AdamW, the diffusers LR schedule and the EMA of the trainable weights.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from leapalign.dtypes import torch_dtype
from leapalign.prompts import FluxPromptEncoder, PromptSource, load_prompts
from leapalign.rewards.base import RewardFn
from leapalign.training.config import LeapAlignConfig, objective_class
from leapalign.training.ema import EMA
from leapalign.training.errors import ConfigError

__all__ = [
    "make_accelerator", "is_pipeline", "adapter_from_pipeline", "network_of", "is_flux_transformer",
    "make_prompt_source", "make_prompt_encoder", "build_reward", "build_objective", "setup_trainable",
    "apply_leapkernels", "resolve_distributed", "apply_fsdp", "trainable_parameters", "broadcast_parameters",
    "make_optimizer", "make_ema", "VelocityInInputDtype",
]

logger = logging.getLogger("leapalign.trainer")


# ---------------------------------------------------------------------------------------------
# device and model
def make_accelerator(cfg: LeapAlignConfig):
    """An ``accelerate.Accelerator`` for ``cfg.device`` / ``cfg.mixed_precision`` (checks the CUDA device)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but torch.cuda.is_available() is False; use device=cpu or auto")
        if ":" in cfg.device:
            index = int(cfg.device.split(":")[1])
            if index >= torch.cuda.device_count():
                raise ConfigError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
            torch.cuda.set_device(index)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.mixed_precision):
        # a previous trainer in this process used another precision: accelerate's state is a
        # process-wide singleton; reset it (not the process group) so this config applies
        AcceleratorState._reset_state(reset_partial_state=False)
    kwargs: dict[str, Any] = dict(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision, project_dir=cfg.output_dir)
    if cfg.log_with:
        kwargs["log_with"] = list(cfg.log_with)
    return Accelerator(**kwargs)


def is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def adapter_from_pipeline(pipe: Any, cfg: LeapAlignConfig, device: torch.device):
    """The pipeline on ``device``, wrapped as a FluxVelocityModel at the config's size and guidance."""
    from leapalign.adapters.flux import FluxVelocityModel

    pipe.to(device)
    return FluxVelocityModel.from_pipeline(
        pipe, height=cfg.model_height, width=cfg.model_width, guidance=cfg.model_guidance,
        gradient_checkpointing=cfg.model_gradient_checkpointing,
    )


def network_of(model: Any) -> nn.Module | None:
    """The denoiser network of an adapter: ``model.transformer`` (Flux, shapes), or the model itself."""
    for attr in ("transformer", "network", "net"):
        net = getattr(model, attr, None)
        if isinstance(net, nn.Module):
            return net
    return model if isinstance(model, nn.Module) else None


def is_flux_transformer(net: Any) -> bool:
    """Whether ``net`` has the diffusers Flux block layout that ``apply_leapkernels_to_flux`` patches."""
    return net is not None and hasattr(net, "transformer_blocks") and hasattr(net, "single_transformer_blocks")


class VelocityInInputDtype:
    """Delegates to a VelocityModel; ``velocity`` returns ``x``'s dtype.

    Under bf16 autocast the network returns bf16 while the rollout state stays in its own dtype
    (fp32 master weights in full fine-tunes); the objective's leap/connector ops need one dtype.
    """

    def __init__(self, model: Any) -> None:
        self._model = model

    def velocity(self, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
        return self._model.velocity(x, sigma, cond).to(x.dtype)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


# ---------------------------------------------------------------------------------------------
# prompts, reward, objective
def make_prompt_source(cfg: LeapAlignConfig, source: PromptSource | Sequence[str] | None) -> PromptSource:
    """``source`` as a PromptSource; default: ``cfg.prompt_file`` or ``cfg.prompts``."""
    if isinstance(source, PromptSource):
        return source
    if source is not None:
        if isinstance(source, str):
            raise TypeError("prompt_source must be a PromptSource or a list of prompts, got a single str")
        return PromptSource(list(source), seed=cfg.seed)
    if cfg.prompt_file:
        return PromptSource(load_prompts(cfg.prompt_file), seed=cfg.seed)
    if cfg.prompts:
        return PromptSource(cfg.prompts, seed=cfg.seed)
    raise ConfigError("no prompts: set prompt_file or prompts in the config, or pass prompt_source")


class _MethodEncoder:
    """Adapts an adapter's ``encode_prompts`` method to the PromptEncoder protocol (no autograd)."""

    def __init__(self, fn: Callable[[Sequence[str]], Any]) -> None:
        self.fn = fn

    def encode(self, prompts: Sequence[str]) -> Any:
        with torch.no_grad():
            return self.fn(list(prompts))


def make_prompt_encoder(encoder: Any, pipeline: Any, model: Any, cfg: LeapAlignConfig, device: torch.device):
    """``encoder`` if given; else the cached Flux encoder of a pipeline, else ``model.encode_prompts``."""
    if encoder is not None:
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"prompt_encoder must have encode(prompts) -> cond, got {type(encoder).__name__}")
        return encoder
    if pipeline is not None:
        return FluxPromptEncoder(pipeline, max_sequence_length=cfg.model_max_sequence_length, device=device)
    if callable(getattr(model, "encode_prompts", None)):
        return _MethodEncoder(model.encode_prompts)
    raise TypeError(
        f"cannot turn prompts into conditioning for {type(model).__name__}: pass prompt_encoder= "
        "(an object with encode(prompts) -> cond) or give the adapter an encode_prompts method"
    )


def build_reward(cfg: LeapAlignConfig, device: torch.device | str | None) -> RewardFn:
    """The CompositeReward of ``cfg.reward_specs``; a spec that cannot be built is a ConfigError."""
    from leapalign.rewards.registry import build_rewards

    try:
        return build_rewards(cfg.reward_specs, dtype=torch_dtype(cfg.reward_dtype), device=device,
                             gradient_checkpointing=cfg.reward_gradient_checkpointing)
    except (ImportError, TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"reward_specs: {' '.join(str(exc).split())}") from exc


def build_objective(cfg: LeapAlignConfig, reward: Any):
    """The objective of ``cfg`` (built once, here); a reward whose terms all have hinges sets its lambda."""
    objective_config = cfg.objective_config()
    hinge = getattr(reward, "hinge", None)
    if hinge is not None and hasattr(objective_config, "hinge_lambda"):
        given = cfg.objective.get("hinge_lambda")
        if given is not None and not math.isclose(float(given), hinge):
            raise ConfigError(
                f"objective.hinge_lambda={given} conflicts with the per-reward hinges in reward_specs "
                f"(sum of weight x hinge = {hinge}); set one or the other"
            )
        objective_config = dataclasses.replace(objective_config, hinge_lambda=hinge)
    return objective_class(cfg.objective_name)(objective_config)


# ---------------------------------------------------------------------------------------------
# what trains
class _ParameterHolder(nn.Module):
    """Gives a bag of parameters (an adapter that is not an ``nn.Module``) stable names."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(list(params))


def _add_lora(cfg: LeapAlignConfig, model: Any, net: nn.Module | None, dtype: torch.dtype) -> None:
    if net is None:
        raise ConfigError(
            f"train_mode='lora' needs the adapter's network as an nn.Module (.transformer); "
            f"{type(model).__name__} has none: use train_mode=full"
        )
    from peft import LoraConfig

    net.requires_grad_(False)
    if isinstance(model, nn.Module):
        model.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
        lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian", target_modules=list(cfg.lora_target_modules),
    )
    try:
        if hasattr(net, "add_adapter"):
            net.add_adapter(lora)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, net)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules} do not fit the model: {exc}") from exc
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def _unfreeze_full(model: Any, net: nn.Module | None, dtype: torch.dtype) -> list[nn.Parameter]:
    trainable = list(model.trainable_parameters())
    if not trainable:
        raise ValueError(f"{type(model).__name__}.trainable_parameters() returned nothing to fine-tune")
    for module in (model, net):
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
        p.data = p.data.to(dtype)
    return trainable


def setup_trainable(cfg: LeapAlignConfig, model: Any, net: nn.Module | None, pipeline: Any) -> nn.Module:
    """Freeze / add LoRA / cast, set up checkpointing; returns the module whose names the trainable
    weights take in checkpoints (the adapter, its network, or a holder of bare parameters)."""
    dtype = torch_dtype(cfg.train_trainable_dtype)
    if cfg.train_mode == "lora":
        _add_lora(cfg, model, net, dtype)
        trainable_ids = {id(p) for p in net.parameters() if p.requires_grad}  # type: ignore[union-attr]
    else:
        trainable_ids = {id(p) for p in _unfreeze_full(model, net, dtype)}
    if isinstance(model, nn.Module):
        state_module: nn.Module = model
    elif net is not None and trainable_ids <= {id(p) for p in net.parameters()}:
        state_module = net
    else:
        state_module = _ParameterHolder(list(model.trainable_parameters()))
    vae = getattr(model, "vae", None)
    if isinstance(vae, nn.Module) and not any(id(p) in trainable_ids for p in vae.parameters()):
        vae.requires_grad_(False)  # frozen: no weight gradients computed or stored in the reward path
    if cfg.model_vae_gradient_checkpointing and vae is not None and hasattr(vae, "enable_gradient_checkpointing"):
        vae.enable_gradient_checkpointing()
    if cfg.model_gradient_checkpointing and pipeline is None and net is not None:
        if hasattr(net, "enable_gradient_checkpointing") and not getattr(net, "gradient_checkpointing", False):
            net.enable_gradient_checkpointing()
    return state_module


def apply_leapkernels(cfg: LeapAlignConfig, net: Any) -> None:
    """Swap leapkernels' fused Flux ops into ``net`` when the config asks (or, on auto, when it is Flux)."""
    if not (cfg.model_use_leapkernels or (cfg.model_use_leapkernels is None and is_flux_transformer(net))):
        return
    from leapkernels.flux import apply_leapkernels_to_flux

    if not is_flux_transformer(net):
        raise ConfigError(
            f"model_use_leapkernels=true needs a diffusers FluxTransformer2DModel as the adapter's .transformer, "
            f"got {type(net).__name__}"
        )
    apply_leapkernels_to_flux(net)


def trainable_parameters(state_module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in state_module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    return [n for n, _ in named], [p for _, p in named]


# ---------------------------------------------------------------------------------------------
# scale-out
def resolve_distributed(cfg: LeapAlignConfig, accelerator: Any) -> str:
    """``none`` | ``ddp`` | ``fsdp`` from ``train_distributed`` and how the processes were launched."""
    from accelerate.utils import DistributedType

    mode, world = cfg.train_distributed, accelerator.num_processes
    if mode == "auto":
        if accelerator.distributed_type == DistributedType.FSDP:
            return "fsdp"
        return "ddp" if world > 1 else "none"
    if mode in ("ddp", "fsdp") and world == 1:
        logger.warning("train_distributed=%s with a single process: nothing to distribute", mode)
        return "none"
    if mode == "none" and world > 1:
        raise ConfigError(f"train_distributed='none' but {world} processes were launched")
    return mode


def apply_fsdp(cfg: LeapAlignConfig, net: nn.Module | None) -> None:
    """FSDP2: ``fully_shard`` each transformer block, then the network root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if net is None:
        raise ConfigError("train_distributed='fsdp' needs the adapter's network as an nn.Module (.transformer)")
    dtypes = {p.dtype for p in net.parameters()}
    param_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    if param_dtype is None and len(dtypes) > 1:  # LoRA fp32 on a bf16 base: all-gather in the base dtype
        param_dtype = torch_dtype(cfg.model_dtype)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = 0
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks", "layers"):
        for block in getattr(net, name, None) or []:
            fully_shard(block, mp_policy=mp)
            blocks += 1
    if blocks == 0:
        logger.warning("FSDP: no transformer_blocks/single_transformer_blocks found; sharding the network as one unit")
    fully_shard(net, mp_policy=mp)


def broadcast_parameters(params: Sequence[nn.Parameter]) -> None:
    """Every data-parallel replica starts from rank 0's weights, as DDP does."""
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


# ---------------------------------------------------------------------------------------------
# optimisation
def make_optimizer(cfg: LeapAlignConfig, params: Sequence[nn.Parameter]):
    """``(AdamW, LR scheduler)`` from the ``train_*`` fields."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=cfg.train_learning_rate, betas=(cfg.train_adam_beta1, cfg.train_adam_beta2),
        eps=cfg.train_adam_epsilon, weight_decay=cfg.train_weight_decay,
    )
    scheduler = get_scheduler(
        cfg.train_lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.train_lr_warmup_steps,
        num_training_steps=cfg.train_num_steps,
    )
    return optimizer, scheduler


def make_ema(cfg: LeapAlignConfig, params: Sequence[nn.Parameter]) -> EMA | None:
    if cfg.train_ema_decay <= 0:
        return None
    return EMA(params, cfg.train_ema_decay, torch_dtype(cfg.train_trainable_dtype))

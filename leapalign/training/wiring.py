"""What a trainer is made of, built from the config: each function takes what it needs and returns
one part (gpt-fast style model surgery in small explicit functions).

- the ``accelerate.Accelerator`` (device, process group, bf16 autocast, trackers);
- the adapter of the pipeline's family (:mod:`leapalign.adapters.families`: a ``FluxPipeline``
  becomes a :class:`~leapalign.adapters.flux.FluxVelocityModel`, a ``Flux2Pipeline`` /
  ``Flux2KleinPipeline`` a ``Flux2VelocityModel``, a ``StableDiffusion3Pipeline`` an
  ``SD3VelocityModel``), the prompt source and the prompt encoder (FLUX.1's
  :class:`~leapalign.prompts.FluxPromptEncoder`, the other families' own cached text path);
- the reward (from ``reward_specs``) and the objective (built once, here, from the config's
  validated objective config and the reward's hinge);
- what trains: peft LoRA on the adapter's network (the family's target modules unless the config
  names others) or a full fine-tune, trainable weights kept in ``train_trainable_dtype`` (fp32
  master weights);
- leapkernels' fused blocks, FSDP2 ``fully_shard`` per block then the root, the DDP start
  broadcast;
- AdamW, the diffusers LR schedule and the EMA of the trainable weights.

``leapalign plan`` (:mod:`leapalign.training.plan_setup`) wires its weightless models with these
same functions, so the plan measures the trainer's own setup.
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
from leapalign.adapters.families import ModelFamily, UnsupportedModelError, family_named, family_of_network, family_of_pipeline
from leapalign.adapters.families import lora_target_modules as family_lora_targets
from leapalign.training.config import FLUX_LORA_TARGET_MODULES, LeapAlignConfig, objective_class
from leapalign.training.ema import EMA
from leapalign.training.errors import ConfigError

__all__ = [
    "make_accelerator", "is_pipeline", "adapter_kwargs", "adapter_from_pipeline", "network_of", "network_family",
    "is_flux_transformer", "lora_targets",
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


def adapter_kwargs(cfg: LeapAlignConfig, family: Any = None) -> dict[str, Any]:
    """The adapter's size, guidance and checkpointing from the config (the planner builds with them too).

    ``model_guidance: null`` takes ``family``'s pipeline default (FLUX.1's 3.5 when no family is given).
    """
    guidance = cfg.model_guidance
    if guidance is None:
        guidance = family.guidance if family is not None else family_named("flux").guidance
    return dict(height=cfg.model_height, width=cfg.model_width, guidance=guidance,
                gradient_checkpointing=cfg.model_gradient_checkpointing)


def adapter_from_pipeline(pipe: Any, cfg: LeapAlignConfig, device: torch.device):
    """The pipeline on ``device``, wrapped as its family's adapter at the config's size and guidance.

    FLUX.2 and SD3 adapters take the pipeline's text path with ``model_max_sequence_length``
    (FLUX.1's is the separate :class:`~leapalign.prompts.FluxPromptEncoder`). A pipeline of another
    family, or a model the adapter cannot serve, is a one-line :class:`ConfigError`.
    """
    try:
        family = family_of_pipeline(pipe)
    except UnsupportedModelError as exc:
        raise ConfigError(str(exc)) from None
    kwargs = adapter_kwargs(cfg, family)
    if family.name != "flux":
        kwargs["max_sequence_length"] = cfg.model_max_sequence_length
    pipe.to(device)
    try:
        return family.adapter_class().from_pipeline(pipe, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{type(pipe).__name__} ({family.label}): {' '.join(str(exc).split())}") from None


def network_of(model: Any) -> nn.Module | None:
    """The denoiser network of an adapter: ``model.transformer`` (Flux, shapes), or the model itself."""
    for attr in ("transformer", "network", "net"):
        net = getattr(model, attr, None)
        if isinstance(net, nn.Module):
            return net
    return model if isinstance(model, nn.Module) else None


def network_family(net: Any) -> ModelFamily | None:
    """The diffusers family of a denoiser network by its class; None for any other network."""
    try:
        return None if net is None else family_of_network(net)
    except UnsupportedModelError:
        return None


def is_flux_transformer(net: Any) -> bool:
    """Whether ``net`` is a diffusers ``FluxTransformer2DModel`` (FLUX.1), which ``apply_leapkernels_to_flux`` patches."""
    family = network_family(net)
    return family is not None and family.name == "flux"


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
    """``encoder`` if given; else FLUX.1's cached encoder of a ``FluxPipeline``, an adapter's own cached
    text path (FLUX.2, SD3: :class:`~leapalign.adapters.prompt_cache.AdapterPromptEncoder`), else
    ``model.encode_prompts``."""
    if encoder is not None:
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"prompt_encoder must have encode(prompts) -> cond, got {type(encoder).__name__}")
        return encoder
    if pipeline is not None and family_of_pipeline(pipeline).name == "flux":
        return FluxPromptEncoder(pipeline, max_sequence_length=cfg.model_max_sequence_length, device=device)
    if getattr(model, "prompt_cache", None) is not None:
        from leapalign.adapters.prompt_cache import AdapterPromptEncoder

        return AdapterPromptEncoder(model)
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


def lora_targets(cfg: LeapAlignConfig, net: nn.Module | None) -> list[str]:
    """``lora_target_modules``; left at its default (FLUX.1's targets) on a FLUX.2 or SD3 network, that
    family's own targets (:func:`leapalign.adapters.families.lora_target_modules`)."""
    targets = list(cfg.lora_target_modules)
    family = network_family(net)
    if family is not None and family.name != "flux" and targets == list(FLUX_LORA_TARGET_MODULES):
        return family_lora_targets(family, net)
    return targets


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
        lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian", target_modules=lora_targets(cfg, net),
    )
    try:
        if hasattr(net, "add_adapter"):
            net.add_adapter(lora)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, net)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules={lora_targets(cfg, net)} do not fit {type(net).__name__}: "
                          f"{' '.join(str(exc).split())}") from None
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


def apply_leapkernels(cfg: LeapAlignConfig, net: Any, enabled: bool | None = None) -> bool:
    """Swap leapkernels' fused ops into ``net`` when asked; returns whether it patched.

    ``enabled`` overrides ``cfg.model_use_leapkernels`` (None: the config's choice, whose ``null``
    means "patch when leapkernels has fused blocks for this network's class"). ``leapkernels.apply_leapkernels``
    dispatches on the class (FLUX.1, FLUX.2, SD3); asking for the patch on any other network is a ConfigError.
    """
    import leapkernels

    use = cfg.model_use_leapkernels if enabled is None else enabled
    supported = tuple(leapkernels.supported_models())
    patchable = net is not None and any(name in supported for name in (c.__name__ for c in type(net).__mro__))
    if use is False or (use is None and not patchable):
        return False
    if not patchable:
        family = network_family(net)
        found = type(net).__name__ + ("" if family is None else f" ({family.label})")
        raise ConfigError(f"model_use_leapkernels=true but leapkernels has no fused blocks for {found}; it patches "
                          f"{', '.join(supported)}: set model_use_leapkernels: false")
    leapkernels.apply_leapkernels(net)
    return True


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


def apply_fsdp(cfg: LeapAlignConfig, net: nn.Module | None, mesh: Any = None) -> None:
    """FSDP2: ``fully_shard`` each transformer block, then the network root (over ``mesh``; default:
    the default process group's 1-D mesh, as ``fully_shard`` builds it)."""
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
            fully_shard(block, mesh=mesh, mp_policy=mp)
            blocks += 1
    if blocks == 0:
        logger.warning("FSDP: no transformer_blocks/single_transformer_blocks found; sharding the network as one unit")
    fully_shard(net, mesh=mesh, mp_policy=mp)


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

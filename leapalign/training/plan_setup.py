"""Build a config's models from their configs and wire them as the trainer does, for one traced step.

:func:`build_setup` runs inside the caller's ``FakeTensorMode`` (or on real tensors, for the proof
tests) and returns an :class:`~leapalign.training.plan_trace.IterationSetup`: the adapter over the
transformer and VAE, the trainable weights (peft LoRA on the configured targets, or the full
transformer) in ``train_trainable_dtype``, diffusers gradient checkpointing, the leapkernels patch,
FSDP2 ``fully_shard`` per block then the root (with the trainer's mixed-precision policy), the
objective with the reward's hinge, AdamW with its state already allocated (an iteration in steady
state) and the EMA.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from leapalign.training.plan_models import ModelSpec, PlanError, clip_vit_h14_config
from leapalign.training.plan_trace import IterationSetup

__all__ = ["build_setup", "default_dtype", "flux_is_patchable"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built in the block get ``dtype`` weights (``.to(dtype)`` on fake modules fails)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flux_is_patchable(net: Any) -> bool:
    return hasattr(net, "transformer_blocks") and hasattr(net, "single_transformer_blocks")


def _build_adapter(cfg: Any, spec: ModelSpec) -> Any:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from leapalign.adapters.flux import FluxVelocityModel

    with torch.device("meta"), default_dtype(_DTYPES[cfg.model_dtype]):
        transformer = FluxTransformer2DModel.from_config(dict(spec.transformer))
        vae = AutoencoderKL.from_config(dict(spec.vae)) if spec.vae is not None else None
    transformer.eval()
    if vae is not None:
        vae.eval()
    try:
        return FluxVelocityModel(transformer, vae=vae, height=cfg.model_height, width=cfg.model_width,
                                 guidance=cfg.model_guidance, gradient_checkpointing=cfg.model_gradient_checkpointing)
    except ValueError as exc:
        raise PlanError(f"{spec.name}: {exc}") from exc


def _setup_trainable(cfg: Any, model: Any) -> list[nn.Parameter]:
    """The trainer's freeze / LoRA / cast, and the VAE's freeze and checkpointing."""
    dtype = _DTYPES[cfg.train_trainable_dtype]
    net = model.transformer
    if cfg.train_mode == "lora":
        from peft import LoraConfig

        net.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank,
                          lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                          target_modules=list(cfg.lora_target_modules))
        try:
            net.add_adapter(lora)
        except ValueError as exc:
            raise PlanError(f"lora_target_modules={cfg.lora_target_modules} do not fit the model: {exc}") from exc
    else:
        net.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(dtype)
    if model.vae is not None:
        model.vae.requires_grad_(False)
        if cfg.model_vae_gradient_checkpointing:
            model.vae.enable_gradient_checkpointing()
    return params


def _apply_fsdp(cfg: Any, net: nn.Module) -> None:
    """The trainer's FSDP2: ``fully_shard`` every block, then the root, over all ranks.

    The 1-D mesh over the process group (what ``fully_shard`` builds by default) is built on real
    tensors first: its construction reads rank coordinates back, which fake tensors cannot answer.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with unset_fake_temporarily():
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))

    dtypes = {p.dtype for p in net.parameters()}
    param_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    if param_dtype is None and len(dtypes) > 1:
        param_dtype = _DTYPES[cfg.model_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(net, name, None) or []:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(net, mesh=mesh, mp_policy=mp)


def _clip_reward(config: dict[str, Any], dtype: torch.dtype, checkpointing: bool, prompts: Sequence[str],
                 scale: float, hps: bool) -> nn.Module:
    """The project's own CLIP / HPS reward forward over a weightless model built from its config."""
    from transformers import CLIPConfig, CLIPModel

    from leapalign.rewards.clip import CLIPReward
    from leapalign.rewards.preprocess import CLIP_MEAN, CLIP_STD

    with torch.device("meta"), default_dtype(dtype):
        clip = CLIPModel(CLIPConfig(**config) if isinstance(config, dict) else config).eval().requires_grad_(False)
    if checkpointing:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        clip.train()
    reward = CLIPReward.__new__(CLIPReward)
    nn.Module.__init__(reward)
    reward.model, reward.tokenizer = clip, None
    reward.image_size = int(clip.config.vision_config.image_size)
    reward.mean, reward.std, reward.scale = CLIP_MEAN, CLIP_STD, float(scale)
    reward._text_cache = {}  # filled with fake unit text features once the weights are fake (build_setup)
    del hps, prompts  # HPSv2.1 scores like CLIP: unit image features . cached unit text features (scale 1)
    return reward


def _reward_term(spec: Any, cfg: Any, prompts: Sequence[str], notes: list[str]) -> tuple[Any, nn.Module | None]:
    """``(reward callable, module holding its weights or None)`` for one ``reward_specs`` entry."""
    from pathlib import Path

    from leapalign.rewards.registry import build_reward

    dtype = _DTYPES[cfg.reward_dtype]
    ckpt = cfg.reward_gradient_checkpointing
    if spec.name in ("brightness", "saturation"):
        return build_reward(spec.name), None
    if spec.name in ("hps", "hpsv2.1"):
        notes.append(f"reward {spec.name!r}: HPSv2.1 planned as CLIP ViT-H/14 shapes (open_clip ViT-H-14), no weights")
        module = _clip_reward(clip_vit_h14_config(), dtype, ckpt, prompts, 1.0, hps=True)
        return module, module
    if spec.name in ("clip", "pickscore"):
        folder = Path(spec.path) if spec.path else None
        if folder is not None and (folder / "config.json").is_file():
            from transformers import CLIPConfig

            config: Any = CLIPConfig.from_pretrained(str(folder))
        elif spec.name == "pickscore":
            config = clip_vit_h14_config()
            notes.append(f"reward 'pickscore': {spec.path!r} has no config.json here; planned PickScore_v1's CLIP ViT-H/14")
        else:
            notes.append(f"reward 'clip': no config.json at {spec.path!r}; its memory and FLOPs are not in this plan")
            return _standin, None
        scale = spec.kwargs.get("scale", 1.0)
        module = _clip_reward(config, dtype, ckpt, prompts, scale if isinstance(scale, (int, float)) else 1.0, hps=False)
        return module, module
    notes.append(f"reward {spec.name!r}: unknown architecture; its memory and FLOPs are not in this plan")
    return _standin, None


def _standin(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A weightless differentiable reward standing in for one the planner cannot build."""
    del prompts
    return images.float().flatten(1).mean(dim=1)


def _build_reward(cfg: Any, prompts: Sequence[str], notes: list[str]) -> tuple[Any, list[nn.Module]]:
    from leapalign.rewards.composite import CompositeReward, RewardTerm

    if not cfg.reward_specs:
        notes.append("no reward_specs: planned with a weightless stand-in reward")
        return _standin, []
    terms, modules = [], []
    for spec in cfg.reward_specs:
        fn, module = _reward_term(spec, cfg, prompts, notes)
        terms.append(RewardTerm(spec.name, fn, spec.weight, spec.hinge))
        if module is not None:
            modules.append(module)
    return CompositeReward(terms), modules


def _objective(cfg: Any, reward: Any) -> Any:
    """The trainer's objective: ``build_objective`` with the composite reward's hinge as lambda."""
    from leapalign.objectives import build_objective

    kwargs = dict(cfg.objective)
    hinge = getattr(reward, "hinge", None)
    if hinge is not None:
        given = kwargs.get("hinge_lambda")
        if given is not None and not math.isclose(float(given), hinge):
            raise PlanError(f"objective.hinge_lambda={given} conflicts with the reward hinges (sum {hinge})")
        kwargs["hinge_lambda"] = hinge
    try:
        return build_objective(cfg.objective_name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"objective_name={cfg.objective_name!r} / objective={kwargs}: {exc}") from exc


def _conditioning(model: Any, batch: int, text_len: int, dtype: torch.dtype) -> Any:
    from leapalign.adapters.flux import FluxConditioning

    tcfg = model.transformer.config
    return FluxConditioning(torch.empty(batch, text_len, tcfg.joint_attention_dim, dtype=dtype),
                            torch.empty(batch, tcfg.pooled_projection_dim, dtype=dtype))


def _steady_state(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], keep_grads: bool) -> None:
    """Allocate AdamW's state as after the first step (zero gradients, lr 0), then drop or keep grads."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)


def _to_fake(modules: Sequence[nn.Module], mode: Any, device: torch.device) -> None:
    """Replace every meta parameter and buffer by a fake tensor on ``device`` (ties kept)."""
    converter = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for table, as_param in ((module._parameters, True), (module._buffers, False)):
                for key, t in list(table.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    if id(t) not in memo:
                        fake = converter.from_meta_and_device(mode, t.detach(), device)
                        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if as_param else fake
                    table[key] = memo[id(t)]


def build_setup(cfg: Any, spec: ModelSpec, *, world_size: int = 1, leapkernels: bool | None = None,
                notes: list[str] | None = None, generator_seed: int = 0) -> IterationSetup:
    """Everything for one traced micro-batch of ``cfg`` on ``spec`` (see the module docstring).

    Call it inside a ``FakeTensorMode``: the models are built and wired on the meta device (peft
    and ``Module.to`` cannot swap fake parameters), then every weight becomes a fake CPU tensor.
    ``leapkernels`` overrides ``cfg.model_use_leapkernels`` (None: the config's choice, whose
    ``null`` means "patch a Flux transformer"). With ``world_size > 1`` a process group must exist.
    """
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = active_fake_mode()
    if mode is None:
        raise RuntimeError("build_setup runs inside a FakeTensorMode (it builds weightless models)")
    notes = notes if notes is not None else []
    prompts = [f"prompt {i}" for i in range(cfg.train_batch_size)]
    with unset_fake_temporarily():
        model = _build_adapter(cfg, spec)
        net = model.transformer
        _setup_trainable(cfg, model)
        use_kernels = cfg.model_use_leapkernels if leapkernels is None else leapkernels
        if use_kernels or (use_kernels is None and flux_is_patchable(net)):
            from leapkernels.flux import apply_leapkernels_to_flux

            apply_leapkernels_to_flux(net)
        reward, reward_modules = _build_reward(cfg, prompts, notes)
    _to_fake([m for m in (net, model.vae, *reward_modules) if m is not None], mode, torch.device("cpu"))
    for module in reward_modules:
        dim = module.model.config.projection_dim
        module._text_cache = {p: torch.empty(dim, dtype=torch.float32) for p in prompts}
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if world_size > 1:
        _apply_fsdp(cfg, net)
    params = [p for p in net.parameters() if p.requires_grad]
    objective = _objective(cfg, reward)
    optimizer = torch.optim.AdamW(params, lr=cfg.train_learning_rate, betas=(cfg.train_adam_beta1, cfg.train_adam_beta2),
                                  eps=cfg.train_adam_epsilon, weight_decay=cfg.train_weight_decay)
    accum = cfg.train_gradient_accumulation_steps
    _steady_state(optimizer, params, keep_grads=accum > 1)
    ema = None
    if cfg.train_ema_decay > 0:
        from leapalign.training.ema import EMA

        ema = EMA(params, cfg.train_ema_decay, _DTYPES[cfg.train_trainable_dtype])
    frozen = [m for m in (model.vae, *reward_modules) if m is not None]
    cond = _conditioning(model, cfg.train_batch_size, spec.text_len, _DTYPES[cfg.model_dtype])
    return IterationSetup(
        model=model, network=net, objective=objective, reward=reward, cond=cond, prompts=prompts, optimizer=optimizer,
        params=params, ema=ema, frozen=frozen, grad_accumulation=accum, max_grad_norm=cfg.train_max_grad_norm,
        autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None, fsdp=world_size > 1,
        generator=torch.Generator().manual_seed(generator_seed), weight_bytes=weight_bytes,
    )

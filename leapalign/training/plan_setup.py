"""Build a config's models from their configs and wire them as the trainer does, for one traced step.

:func:`build_setup` runs inside the caller's ``FakeTensorMode`` (or on real tensors, for the proof
tests) and returns an :class:`~leapalign.training.plan_trace.IterationSetup`. The models are the
spec's family's (FLUX.1, FLUX.2, SD3: transformer, VAE and adapter built from their configs); the
wiring is the trainer's own, :mod:`leapalign.training.wiring`: ``setup_trainable`` (freeze, peft
LoRA on the family's targets or the full transformer, ``train_trainable_dtype``, VAE freeze and
checkpointing), ``apply_leapkernels``, ``apply_fsdp`` (per block then the root, the trainer's
mixed-precision policy), ``build_objective`` (the reward's hinge as lambda), ``make_optimizer``
(AdamW, its state allocated as after one step: an iteration in steady state) and ``make_ema``.
Only the reward differs: weightless models built from their configs (the trainer loads weights).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from leapalign.training import wiring
from leapalign.training.plan_models import ModelSpec, PlanError, clip_vit_h14_config
from leapalign.training.plan_trace import IterationSetup

__all__ = ["build_setup", "default_dtype"]

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


def _build_adapter(cfg: Any, spec: ModelSpec) -> Any:
    """The spec's family's transformer and VAE on the meta device, wrapped as the trainer wraps them."""
    import diffusers

    from leapalign.adapters.families import family_named

    family = family_named(spec.family)
    with torch.device("meta"), default_dtype(_DTYPES[cfg.model_dtype]):
        transformer = getattr(diffusers, family.transformer).from_config(dict(spec.transformer))
        vae = getattr(diffusers, family.vae).from_config(dict(spec.vae)) if spec.vae is not None else None
    transformer.eval()
    if vae is not None:
        vae.eval()
    kwargs = wiring.adapter_kwargs(cfg, family)
    if family.name == "flux2":  # klein base: classifier-free guidance, as Flux2VelocityModel.from_pipeline decides
        kwargs["cfg"] = spec.pipeline == "Flux2KleinPipeline" and not spec.distilled
    try:
        return family.adapter_class()(transformer, vae=vae, **kwargs)
    except ValueError as exc:
        raise PlanError(f"{spec.name}: {exc}") from exc


def _mesh() -> Any:
    """The 1-D mesh over the process group that ``fully_shard`` builds by default, built on real
    tensors: its construction reads rank coordinates back, which fake tensors cannot answer."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


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


def _conditioning(model: Any, spec: ModelSpec, batch: int, dtype: torch.dtype) -> Any:
    """Empty prompt embeddings of the shapes the family's text path produces (negatives when CFG is on)."""
    tcfg = model.transformer.config
    if spec.family == "flux":
        from leapalign.adapters.flux import FluxConditioning

        return FluxConditioning(torch.empty(batch, spec.text_len, tcfg.joint_attention_dim, dtype=dtype),
                                torch.empty(batch, tcfg.pooled_projection_dim, dtype=dtype))
    if spec.family == "flux2":
        from leapalign.adapters.flux2 import Flux2Conditioning

        embeds = torch.empty(batch, spec.text_len, tcfg.joint_attention_dim, dtype=dtype)
        return Flux2Conditioning(embeds, torch.empty_like(embeds) if model.do_cfg else None)
    from leapalign.adapters.sd3 import SD3Conditioning

    # CLIP-L/G's 77 tokens, then T5's max_sequence_length (StableDiffusion3Pipeline.encode_prompt)
    parts = [torch.empty(batch, 77 + spec.text_len, tcfg.joint_attention_dim, dtype=dtype),
             torch.empty(batch, tcfg.pooled_projection_dim, dtype=dtype)]
    return SD3Conditioning(*parts, *([torch.empty_like(p) for p in parts] if model.do_cfg else []))


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
    ``null`` means "patch where leapkernels has fused blocks"). With ``world_size > 1`` a process
    group must exist.
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
        wiring.setup_trainable(cfg, model, net, pipeline=None)
        patched = wiring.apply_leapkernels(cfg, net, enabled=leapkernels)
        if not patched and (cfg.model_use_leapkernels if leapkernels is None else leapkernels) is None:
            notes.append(f"leapkernels: no fused blocks for {type(net).__name__} yet; planned eager")
        reward, reward_modules = _build_reward(cfg, prompts, notes)
    _to_fake([m for m in (net, model.vae, *reward_modules) if m is not None], mode, torch.device("cpu"))
    for module in reward_modules:
        dim = module.model.config.projection_dim
        module._text_cache = {p: torch.empty(dim, dtype=torch.float32) for p in prompts}
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if world_size > 1:
        wiring.apply_fsdp(cfg, net, mesh=_mesh())
    _, params = wiring.trainable_parameters(net)
    objective = wiring.build_objective(cfg, reward)
    optimizer, _ = wiring.make_optimizer(cfg, params)
    accum = cfg.train_gradient_accumulation_steps
    _steady_state(optimizer, params, keep_grads=accum > 1)
    ema = wiring.make_ema(cfg, params)
    frozen = [m for m in (model.vae, *reward_modules) if m is not None]
    cond = _conditioning(model, spec, cfg.train_batch_size, _DTYPES[cfg.model_dtype])
    return IterationSetup(
        model=model, network=net, objective=objective, reward=reward, cond=cond, prompts=prompts, optimizer=optimizer,
        params=params, ema=ema, frozen=frozen, grad_accumulation=accum, max_grad_norm=cfg.train_max_grad_norm,
        autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None, fsdp=world_size > 1,
        generator=torch.Generator().manual_seed(generator_seed), weight_bytes=weight_bytes,
    )

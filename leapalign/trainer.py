"""``LeapAlignTrainer``: the drop-in trainer around any :class:`~leapalign.adapters.base.VelocityModel`.

What it owns (the objective owns the maths, the adapter the model specifics):

- an ``accelerate.Accelerator`` (device, process group under ``accelerate launch``/``torchrun``,
  bf16 autocast, trackers); gradient accumulation is done by hand (loss / A, one backward per
  micro-batch) so it is the same code on one process, under data parallelism and under FSDP2;
- what trains: peft LoRA on the adapter's network (diffusers' Flux target modules) or a full
  fine-tune, trainable weights kept in ``train_trainable_dtype`` (fp32 master weights);
- AdamW, global grad-norm clipping, a diffusers LR schedule, EMA of the trainable weights (used for
  sample grids and exported);
- faults: a non-finite loss or gradient skips the step -- weights, optimiser, scheduler and EMA
  untouched -- is counted and logged, and ``train_max_nonfinite_steps`` in a row raise
  :class:`NonFiniteLossError`;
- determinism: the noise/leap-step generator of every micro-batch is seeded from
  ``(seed, step, micro-batch, rank)`` and the prompt order is a pure function of the position, so
  a run killed and resumed from a checkpoint continues bit-identically on CPU;
- scale-out: ``ddp`` all-reduces the accumulated gradients once per optimiser step (bucketed by
  dtype; unlike ``DistributedDataParallel``'s hooks this is correct when the objective calls the
  network several times with autograd before one backward, as LeapAlign does); ``fsdp`` applies
  FSDP2 ``fully_shard`` to every transformer block and then the root.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from leapalign.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume,
    restore_rng_state,
    write_checkpoint,
)
from leapalign.config import ConfigError, LeapAlignConfig
from leapalign.ema import EMA
from leapalign.prompts import FluxPromptEncoder, PromptSource, load_prompts
from leapalign.rewards.base import RewardFn

__all__ = ["LeapAlignTrainer", "NonFiniteLossError", "TrainResult", "torch_dtype"]

logger = logging.getLogger("leapalign.trainer")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_flux_transformer(net: Any) -> bool:
    """Whether ``net`` has the diffusers Flux block layout that ``apply_leapkernels_to_flux`` patches."""
    return net is not None and hasattr(net, "transformer_blocks") and hasattr(net, "single_transformer_blocks")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}") from None


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN/Inf loss or gradient (each one was skipped)."""


@dataclass
class TrainResult:
    """What :meth:`LeapAlignTrainer.train` returns."""

    step: int
    skipped_steps: int
    last_metrics: dict[str, float]
    checkpoint: Path | None


class _ParameterHolder(nn.Module):
    """Gives a bag of parameters (an adapter that is not an ``nn.Module``) stable names."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(list(params))


def _network_of(model: Any) -> nn.Module | None:
    """The denoiser network of an adapter: ``model.transformer`` (Flux, shapes), or the model itself."""
    for attr in ("transformer", "network", "net"):
        net = getattr(model, attr, None)
        if isinstance(net, nn.Module):
            return net
    return model if isinstance(model, nn.Module) else None


def _is_pipeline(obj: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``t``; DTensor shards are gathered (a collective: every rank calls it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def _assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``dst``, slicing it into ``dst``'s shard when ``dst`` is a DTensor."""
    with torch.no_grad():
        if hasattr(dst, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
            dst.copy_(full)
        else:
            dst.copy_(full.to(dst.device, dst.dtype))


def _like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref`` (sharded when ``ref`` is a DTensor)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
    return full.to(ref.device, ref.dtype)


class LeapAlignTrainer:
    """Post-train a flow-matching model on a differentiable reward.

    Args:
        config: a validated :class:`~leapalign.config.LeapAlignConfig`.
        model: a diffusers ``FluxPipeline`` (wrapped in :class:`~leapalign.adapters.flux.FluxVelocityModel`
            and a cached :class:`~leapalign.prompts.FluxPromptEncoder`) or any ``VelocityModel``.
        reward: ``(images [B,3,H,W] in [0,1], prompts) -> [B]``; default: built from
            ``config.reward_specs`` (a :class:`~leapalign.rewards.CompositeReward`).
        prompt_source: a :class:`PromptSource` or a list of prompts; default: ``config.prompt_file``
            or ``config.prompts``.
        prompt_encoder: ``encode(prompts) -> cond`` for the model; default: the Flux encoder for a
            pipeline, else the adapter's own ``encode_prompts`` method.
        objective: an :class:`~leapalign.objectives.base.Objective`; default:
            ``build_objective(config.objective_name, **config.objective)``.
    """

    def __init__(
        self,
        config: LeapAlignConfig,
        model: Any,
        reward: RewardFn | None = None,
        prompt_source: PromptSource | Sequence[str] | None = None,
        *,
        prompt_encoder: Any = None,
        objective: Any = None,
    ) -> None:
        if not isinstance(config, LeapAlignConfig):
            raise TypeError(f"config must be a LeapAlignConfig, got {type(config).__name__}")
        self.config = config
        self.prompt_source = self._make_prompt_source(prompt_source)
        self.accelerator = self._make_accelerator()
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        from accelerate.utils import set_seed

        set_seed(config.seed)  # LoRA init and anything else drawing from the global RNGs

        self.pipeline = None
        if _is_pipeline(model):
            self.pipeline = model
            model = self._adapter_from_pipeline(model)
        elif hasattr(model, "to") and callable(model.to):
            model.to(self.device)
        self.model = model
        self._rollout_model = _VelocityInInputDtype(model) if config.mixed_precision != "no" else model
        self.prompt_encoder = self._make_prompt_encoder(prompt_encoder)
        self._precompute_prompts()  # before LoRA/upcasting/sharding: the text encoders leave memory first

        self.reward = reward if reward is not None else self._build_reward()
        self.objective = objective if objective is not None else self._build_objective()

        self.network = _network_of(model)
        self._setup_trainable()
        if config.model_use_leapkernels or (config.model_use_leapkernels is None and _is_flux_transformer(self.network)):
            self._apply_leapkernels()
        self.distributed = self._resolve_distributed()
        if self.distributed == "fsdp":
            self._apply_fsdp()
        named = [(n, p) for n, p in self.state_module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
        if self.distributed == "ddp":  # every replica starts from rank 0's weights, as DDP does
            with torch.no_grad():
                for p in self.params:
                    torch.distributed.broadcast(p.data, src=0)

        cfg = config
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.train_learning_rate, betas=(cfg.train_adam_beta1, cfg.train_adam_beta2),
            eps=cfg.train_adam_epsilon, weight_decay=cfg.train_weight_decay,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.train_lr_scheduler, optimizer=self.optimizer, num_warmup_steps=cfg.train_lr_warmup_steps,
            num_training_steps=cfg.train_num_steps,
        )
        self.ema = EMA(self.params, cfg.train_ema_decay, torch_dtype(cfg.train_trainable_dtype)) if cfg.train_ema_decay > 0 else None
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.last_metrics: dict[str, float] = {}
        self._last_saved_step: int | None = None

    # ------------------------------------------------------------------------------------------
    # construction helpers
    def _make_prompt_source(self, source: PromptSource | Sequence[str] | None) -> PromptSource:
        cfg = self.config
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

    def _make_accelerator(self):
        from accelerate import Accelerator

        cfg = self.config
        if cfg.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device={cfg.device!r} but torch.cuda.is_available() is False; use device=cpu or auto")
            if ":" in cfg.device:
                index = int(cfg.device.split(":")[1])
                if index >= torch.cuda.device_count():
                    raise ConfigError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
                torch.cuda.set_device(index)
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") not in (None, cfg.mixed_precision):
            # a previous trainer in this process used another precision: accelerate's state is a
            # process-wide singleton; reset it (not the process group) so this config applies
            AcceleratorState._reset_state(reset_partial_state=False)
        kwargs: dict[str, Any] = dict(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision, project_dir=cfg.output_dir)
        if cfg.log_with:
            kwargs["log_with"] = list(cfg.log_with)
        return Accelerator(**kwargs)

    def _adapter_from_pipeline(self, pipe: Any):
        from leapalign.adapters.flux import FluxVelocityModel

        cfg = self.config
        pipe.to(self.device)
        return FluxVelocityModel.from_pipeline(
            pipe, height=cfg.model_height, width=cfg.model_width, guidance=cfg.model_guidance,
            gradient_checkpointing=cfg.model_gradient_checkpointing,
        )

    def _make_prompt_encoder(self, encoder: Any):
        if encoder is not None:
            if not callable(getattr(encoder, "encode", None)):
                raise TypeError(f"prompt_encoder must have encode(prompts) -> cond, got {type(encoder).__name__}")
            return encoder
        if self.pipeline is not None:
            return FluxPromptEncoder(self.pipeline, max_sequence_length=self.config.model_max_sequence_length, device=self.device)
        if callable(getattr(self.model, "encode_prompts", None)):
            return _MethodEncoder(self.model.encode_prompts)
        raise TypeError(
            f"cannot turn prompts into conditioning for {type(self.model).__name__}: pass prompt_encoder= "
            "(an object with encode(prompts) -> cond) or give the adapter an encode_prompts method"
        )

    def _build_reward(self) -> RewardFn:
        from leapalign.rewards.registry import build_rewards

        cfg = self.config
        return build_rewards(cfg.reward_specs, dtype=torch_dtype(cfg.reward_dtype), device=self.device,
                             gradient_checkpointing=cfg.reward_gradient_checkpointing)

    def _build_objective(self):
        from leapalign.objectives import build_objective

        cfg = self.config
        kwargs = dict(cfg.objective)
        hinge = getattr(self.reward, "hinge", None)
        if hinge is not None:
            given = kwargs.get("hinge_lambda")
            if given is not None and not math.isclose(float(given), hinge):
                raise ConfigError(
                    f"objective.hinge_lambda={given} conflicts with the per-reward hinges in reward_specs "
                    f"(sum of weight x hinge = {hinge}); set one or the other"
                )
            kwargs["hinge_lambda"] = hinge
        try:
            return build_objective(cfg.objective_name, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"objective_name={cfg.objective_name!r} / objective={kwargs}: {exc}") from exc

    def _setup_trainable(self) -> None:
        """Freeze / add LoRA / cast, and decide which module names the trainable weights."""
        cfg = self.config
        dtype = torch_dtype(cfg.train_trainable_dtype)
        net = self.network
        if cfg.train_mode == "lora":
            if net is None:
                raise ConfigError(
                    f"train_mode='lora' needs the adapter's network as an nn.Module (.transformer); "
                    f"{type(self.model).__name__} has none: use train_mode=full"
                )
            from peft import LoraConfig

            net.requires_grad_(False)
            if isinstance(self.model, nn.Module):
                self.model.requires_grad_(False)
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
        else:
            trainable = list(self.model.trainable_parameters())
            if not trainable:
                raise ValueError(f"{type(self.model).__name__}.trainable_parameters() returned nothing to fine-tune")
            for module in (self.model, net):
                if isinstance(module, nn.Module):
                    module.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
                p.data = p.data.to(dtype)
        trainable_ids = {id(p) for p in (net.parameters() if cfg.train_mode == "lora" else trainable) if p.requires_grad}
        if isinstance(self.model, nn.Module):
            self.state_module: nn.Module = self.model
        elif net is not None and trainable_ids <= {id(p) for p in net.parameters()}:
            self.state_module = net
        else:
            self.state_module = _ParameterHolder(list(self.model.trainable_parameters()))
        vae = getattr(self.model, "vae", None)
        if isinstance(vae, nn.Module) and not any(id(p) in trainable_ids for p in vae.parameters()):
            vae.requires_grad_(False)  # frozen: no weight gradients computed or stored in the reward path
        if cfg.model_vae_gradient_checkpointing and vae is not None and hasattr(vae, "enable_gradient_checkpointing"):
            vae.enable_gradient_checkpointing()
        if cfg.model_gradient_checkpointing and self.pipeline is None and net is not None:
            if hasattr(net, "enable_gradient_checkpointing") and not getattr(net, "gradient_checkpointing", False):
                net.enable_gradient_checkpointing()

    def _apply_leapkernels(self) -> None:
        """Swap leapkernels' fused Flux ops into the network (LoRA-wrapped projections keep working)."""
        from leapkernels.flux import apply_leapkernels_to_flux

        net = self.network
        if not _is_flux_transformer(net):
            raise ConfigError(
                f"model_use_leapkernels=true needs a diffusers FluxTransformer2DModel as the adapter's .transformer, "
                f"got {type(net).__name__}"
            )
        apply_leapkernels_to_flux(net)

    def _resolve_distributed(self) -> str:
        from accelerate.utils import DistributedType

        mode = self.config.train_distributed
        if mode == "auto":
            if self.accelerator.distributed_type == DistributedType.FSDP:
                return "fsdp"
            return "ddp" if self.world_size > 1 else "none"
        if mode in ("ddp", "fsdp") and self.world_size == 1:
            logger.warning("train_distributed=%s with a single process: nothing to distribute", mode)
            return "none"
        if mode == "none" and self.world_size > 1:
            raise ConfigError(f"train_distributed='none' but {self.world_size} processes were launched")
        return mode

    def _apply_fsdp(self) -> None:
        """FSDP2: ``fully_shard`` each transformer block, then the network root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        net = self.network
        if net is None:
            raise ConfigError("train_distributed='fsdp' needs the adapter's network as an nn.Module (.transformer)")
        dtypes = {p.dtype for p in net.parameters()}
        param_dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else None
        if param_dtype is None and len(dtypes) > 1:  # LoRA fp32 on a bf16 base: all-gather in the base dtype
            param_dtype = torch_dtype(self.config.model_dtype)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        blocks = 0
        for name in ("transformer_blocks", "single_transformer_blocks", "blocks", "layers"):
            for block in getattr(net, name, None) or []:
                fully_shard(block, mp_policy=mp)
                blocks += 1
        if blocks == 0:
            logger.warning("FSDP: no transformer_blocks/single_transformer_blocks found; sharding the network as one unit")
        fully_shard(net, mp_policy=mp)

    # ------------------------------------------------------------------------------------------
    # one optimiser step
    def micro_batch_prompts(self, step: int, micro: int) -> list[str]:
        """Prompts of (step, micro-batch) on this rank: a slice of the global batch at that position."""
        cfg = self.config
        b, a = cfg.train_batch_size, cfg.train_gradient_accumulation_steps
        start = ((step * a + micro) * self.world_size + self.rank) * b
        return self.prompt_source.prompts_at(range(start, start + b))

    def micro_batch_generator(self, step: int, micro: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.config.seed, step, micro, self.rank]).generate_state(1)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    def compute_gradients(self, step: int) -> tuple[bool, dict[str, float]]:
        """Forward + backward over the step's micro-batches, gradients synchronised across ranks.

        Returns ``(finite, metrics)``: ``finite`` is False when any rank saw a non-finite loss or
        the global gradient norm is not finite. Every rank always runs every backward (FSDP's
        collectives must match), even after a NaN.
        """
        cfg = self.config
        accum = cfg.train_gradient_accumulation_steps
        sums: dict[str, float] = {}
        loss_ok = True
        for micro in range(accum):
            prompts = self.micro_batch_prompts(step, micro)
            cond = self.prompt_encoder.encode(prompts)
            with self.accelerator.autocast():
                out = self.objective(self._rollout_model, cond, prompts, self.reward, generator=self.micro_batch_generator(step, micro))
            loss = out.loss
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
                raise RuntimeError(f"the objective must return a scalar loss with a gradient, got {loss!r}")
            loss_ok &= bool(torch.isfinite(loss.detach()))
            (loss / accum).backward()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
            for k, v in getattr(self.reward, "last_components", {}).items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        if self.distributed == "ddp":
            self._all_reduce_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        else:
            norm = torch.zeros((), device=self.device)
        self._grad_norm = norm
        norm_value = float(_full(norm)) if hasattr(norm, "full_tensor") else float(norm)
        finite = loss_ok and math.isfinite(norm_value)
        if self.world_size > 1:
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = bool(flag.item() == 0.0)
            for key in ("loss", "reward_mean"):
                if key in sums:
                    t = torch.tensor([sums[key]], device=self.device, dtype=torch.float64)
                    torch.distributed.all_reduce(t)
                    sums[key] = float(t.item()) / self.world_size
        sums["grad_norm"] = norm_value
        return finite, sums

    def _all_reduce_gradients(self) -> None:
        """Average gradients over ranks: one flat all-reduce per dtype (missing grads count as 0)."""
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for params in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def training_step(self) -> dict[str, float]:
        """One optimiser step (or one skipped step on a non-finite loss/gradient); advances ``self.step``."""
        cfg = self.config
        finite, metrics = self.compute_gradients(self.step)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            logger.warning(
                "step %d: non-finite loss or gradient (grad_norm=%s); step skipped, weights unchanged "
                "(%d in a row, %d total)", self.step, metrics.get("grad_norm"), self.nonfinite_in_row, self.nonfinite_total,
            )
            if self.nonfinite_in_row >= cfg.train_max_nonfinite_steps:
                self.step += 1  # the skipped step is consumed
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} optimiser steps in a row had a NaN/Inf loss or gradient "
                    f"(train_max_nonfinite_steps={cfg.train_max_nonfinite_steps}); stopping after step {self.step}. "
                    "Check the reward for NaNs, lower train_learning_rate, or use mixed_precision=no."
                )
        else:
            if cfg.train_max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.train_max_grad_norm, self._grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_in_row = 0
        self.step += 1
        metrics.update(
            step=float(self.step), lr=float(self.lr_scheduler.get_last_lr()[0]), skipped=float(not finite),
            nonfinite_total=float(self.nonfinite_total),
        )
        self.last_metrics = metrics
        return metrics

    # ------------------------------------------------------------------------------------------
    # the loop
    def train(self) -> TrainResult:
        """Run until ``train_num_steps`` (resuming first when ``ckpt_resume_from`` is set)."""
        from tqdm.auto import tqdm

        cfg = self.config
        resume = resolve_resume(cfg.ckpt_resume_from, cfg.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        out = Path(cfg.output_dir)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(out / "config.yaml")
        if cfg.log_with:
            self.accelerator.init_trackers(cfg.tracker_project_name, config=_flat_config(cfg))
        progress = tqdm(total=cfg.train_num_steps, initial=self.step, disable=not self.is_main, desc="leapalign")
        try:
            while self.step < cfg.train_num_steps:
                metrics = self.training_step()
                progress.update(1)
                progress.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.4f}", loss=f"{metrics.get('loss', float('nan')):.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.train_num_steps:
                    self._log(metrics)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.train_num_steps:
                    self.save_checkpoint()
            if cfg.ckpt_save_final and self._last_saved_step != self.step:
                self.save_checkpoint()
        finally:
            progress.close()
            if cfg.log_with:
                self.accelerator.end_training()
        last = latest_checkpoint(cfg.output_dir) if self._last_saved_step is not None else None
        return TrainResult(self.step, self.nonfinite_total, dict(self.last_metrics), last)

    def _precompute_prompts(self) -> None:
        """Encode every prompt once, then free the text encoders (Flux): they never run again."""
        enc = self.prompt_encoder
        if isinstance(enc, FluxPromptEncoder) and not enc.released:
            enc.precompute(list(self.prompt_source.prompts) + self._sample_prompts())
            enc.release_text_encoders()

    def _log(self, metrics: dict[str, float]) -> None:
        if self.config.log_with:
            self.accelerator.log(metrics, step=self.step)
        if self.is_main:
            Path(self.config.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.config.output_dir) / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}) + "\n")

    # ------------------------------------------------------------------------------------------
    # samples
    def _sample_prompts(self) -> list[str]:
        cfg = self.config
        prompts = list(cfg.sample_prompts) or list(self.prompt_source.prompts)
        reps = -(-cfg.sample_num_images // len(prompts))
        return (prompts * reps)[: cfg.sample_num_images]

    def save_samples(self) -> Path | None:
        """A PNG grid of ``sample_num_images`` images (EMA weights, fixed seed) in ``output_dir/samples``."""
        from leapalign.sampling import euler_sample, save_image_grid

        cfg = self.config
        if not self.is_main and self.distributed != "fsdp":
            return None
        prompts = self._sample_prompts()
        cond = self.prompt_encoder.encode(prompts)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        swap = self.ema.swapped_in() if (self.ema is not None and cfg.sample_use_ema) else _null()
        with swap, self.accelerator.autocast():
            images = euler_sample(self._rollout_model, cond, len(prompts), cfg.sample_num_steps, gen)
        if not self.is_main:
            return None
        path = Path(cfg.output_dir) / "samples" / f"step-{self.step:08d}.png"
        save_image_grid(images, path)
        return path

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (see :mod:`leapalign.checkpoint`); every rank must call it."""
        cfg = self.config
        trainable = {n: _full(p) for n, p in zip(self.param_names, self.params)}
        ema = {n: _full(s) for n, s in zip(self.param_names, self.ema.shadow)} if self.ema is not None else None
        optim = self.optimizer.state_dict()
        optim["state"] = {k: {sk: _full(sv) if isinstance(sv, torch.Tensor) else sv for sk, sv in st.items()}
                          for k, st in optim["state"].items()}
        full_weights = None
        if cfg.train_mode == "full" and self.network is not None:
            full_weights = {k: _full(v) for k, v in self.network.state_dict().items()}
        rng = [capture_rng_state()]
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        path = None
        if self.is_main:
            state = {
                "step": self.step, "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total,
                "world_size": self.world_size, "train_mode": cfg.train_mode, "param_names": self.param_names,
                "param_shapes": [list(t.shape) for t in trainable.values()],
                "config": cfg.to_dict(),
            }

            def write(tmp: Path) -> None:
                from safetensors.torch import save_file

                save_file(trainable, str(tmp / "trainable.safetensors"))
                if ema is not None:
                    save_file(ema, str(tmp / "ema.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng, tmp / "rng.pt")
                self._export_weights(tmp, ema if ema is not None else trainable, full_weights)
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

            path = write_checkpoint(cfg.output_dir, self.step, write)
            prune_checkpoints(cfg.output_dir, cfg.ckpt_keep_last)
        self._last_saved_step = self.step
        self.accelerator.wait_for_everyone()
        return path

    def _export_weights(self, tmp: Path, weights: dict[str, torch.Tensor], full_weights: dict[str, torch.Tensor] | None) -> None:
        """The deliverable: diffusers-format LoRA, or the full network as safetensors (EMA weights)."""
        from safetensors.torch import save_file

        net = self.network
        prefix = self._network_prefix()
        if self.config.train_mode == "lora" and net is not None and hasattr(net, "peft_config"):
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            local = {n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)}
            lora = get_peft_model_state_dict(net, state_dict=local)
            meta = net.peft_config["default"].to_dict()
            FluxPipeline.save_lora_weights(tmp / "lora", transformer_lora_layers=lora, safe_serialization=True,
                                           transformer_lora_adapter_metadata=meta)
        elif full_weights is not None:
            merged = dict(full_weights)
            for n, t in weights.items():
                if n.startswith(prefix) and n[len(prefix):] in merged:
                    key = n[len(prefix):]
                    merged[key] = t.to(merged[key].dtype)
            (tmp / "transformer").mkdir()
            save_file(merged, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"))
            if hasattr(net, "save_config"):
                net.save_config(tmp / "transformer")

    def _network_prefix(self) -> str:
        if self.network is None or self.network is self.state_module:
            return ""
        for name, mod in self.state_module.named_modules():
            if mod is self.network:
                return name + "."
        return ""

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser, scheduler, RNG, step and fault counters (every rank)."""
        from safetensors.torch import load_file

        path = Path(path)
        state = read_trainer_state(path)
        if state.get("train_mode") != self.config.train_mode:
            raise CheckpointError(f"{path} was trained with train_mode={state.get('train_mode')!r}, config says {self.config.train_mode!r}")
        shapes = [list(p.shape) for p in self.params]  # a DTensor's shape is the global one
        if state.get("param_names") != self.param_names or state.get("param_shapes", shapes) != shapes:
            raise CheckpointError(f"{path} holds different trainable parameters than this model (LoRA targets/rank or model changed)")
        trainable = load_file(str(path / "trainable.safetensors"))
        for n, p in zip(self.param_names, self.params):
            _assign(p, trainable[n])
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise CheckpointError(f"{path} has no ema.safetensors but train_ema_decay > 0")
            ema = load_file(str(path / "ema.safetensors"))
            for n, s in zip(self.param_names, self.ema.shadow):
                _assign(s, ema[n])
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        for k, st in optim["state"].items():
            ref = self.params[int(k)]
            optim["state"][k] = {sk: (_like(ref, sv) if isinstance(sv, torch.Tensor) and sv.shape == ref.shape else sv)
                                 for sk, sv in st.items()}
        self.optimizer.load_state_dict(optim)
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
        if len(rng) != self.world_size:
            logger.warning("checkpoint was written by %d process(es), resuming on %d: RNG states reused by rank", len(rng), self.world_size)
        restore_rng_state(rng[self.rank % len(rng)])
        self.step = int(state["step"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self._last_saved_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)


class _VelocityInInputDtype:
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


class _MethodEncoder:
    """Adapts an adapter's ``encode_prompts`` method to the PromptEncoder protocol (no autograd)."""

    def __init__(self, fn: Callable[[Sequence[str]], Any]) -> None:
        self.fn = fn

    def encode(self, prompts: Sequence[str]) -> Any:
        with torch.no_grad():
            return self.fn(list(prompts))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _flat_config(cfg: LeapAlignConfig) -> dict[str, Any]:
    flat = {}
    for k, v in cfg.to_dict().items():
        flat[k] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return flat

"""``LeapAlignTrainer``: the drop-in trainer around any :class:`~leapalign.adapters.base.VelocityModel`.

This file holds the training step and the loop; what the trainer is made of is built by
:mod:`leapalign.training.wiring`, checkpoints are :mod:`leapalign.training.checkpointing`, the
output folder's ownership and log are :mod:`leapalign.training.run_dir`.

- gradient accumulation is done by hand (loss / A, one backward per micro-batch) so it is the same
  code on one process, under data parallelism and under FSDP2;
- faults: a non-finite loss or gradient skips the step -- weights, optimiser, scheduler and EMA
  untouched -- is counted and logged, and ``train_max_nonfinite_steps`` in a row raise
  :class:`NonFiniteLossError`; a reward that gives the loss no gradient is a
  :class:`RewardGradientError` at the first step;
- step numbers are 1-based everywhere a user reads them: "step N" in a warning or an error, the
  ``step`` of ``metrics.jsonl`` and ``checkpoints/step-N`` all mean the N-th optimiser step;
- determinism: the noise/leap-step generator of every micro-batch is seeded from
  ``(seed, step, micro-batch, rank)`` and the prompt order is a pure function of the position, so
  a run killed and resumed from a checkpoint continues bit-identically on CPU;
- scale-out: ``ddp`` all-reduces the accumulated gradients once per optimiser step (bucketed by
  dtype; unlike ``DistributedDataParallel``'s hooks this is correct when the objective calls the
  network several times with autograd before one backward, as LeapAlign does); ``fsdp`` applies
  FSDP2 ``fully_shard`` to every transformer block and then the root.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from leapalign.prompts import PromptSource
from leapalign.rollout_engine import wrap_rollout
from leapalign.rewards.base import RewardFn, RewardNotDifferentiableError
from leapalign.training import checkpointing, wiring
from leapalign.training.checkpoint_dir import checkpoint_root, resolve_resume
from leapalign.training.config import LeapAlignConfig
from leapalign.training.errors import NonFiniteLossError, RewardGradientError
from leapalign.training.faults import fault_point
from leapalign.training.run_dir import append_metrics, claim_run_dir, truncate_metrics

__all__ = ["LeapAlignTrainer", "NonFiniteLossError", "RewardGradientError", "TrainResult"]

logger = logging.getLogger("leapalign.trainer")


@dataclass
class TrainResult:
    """What :meth:`LeapAlignTrainer.train` returns."""

    step: int
    skipped_steps: int
    last_metrics: dict[str, float]
    checkpoint: Path | None


class LeapAlignTrainer:
    """Post-train a flow-matching model on a differentiable reward.

    Args:
        config: a validated :class:`~leapalign.training.config.LeapAlignConfig`.
        model: a diffusers pipeline of a supported family (FLUX.1, FLUX.2, SD3; wrapped in the family's
            velocity adapter and prompt encoder, :mod:`leapalign.adapters.families`) or any ``VelocityModel``.
        reward: ``(images [B,3,H,W] in [0,1], prompts) -> [B]``; default: built from
            ``config.reward_specs`` (a :class:`~leapalign.rewards.CompositeReward`).
        prompt_source: a :class:`PromptSource` or a list of prompts; default: ``config.prompt_file``
            or ``config.prompts``.
        prompt_encoder: ``encode(prompts) -> cond`` for the model; default: the Flux encoder for a
            pipeline, else the adapter's own ``encode_prompts`` method.
        objective: an :class:`~leapalign.objectives.base.Objective`; default: the config's
            ``objective_name`` configured by ``objective``.
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
        from accelerate.utils import set_seed

        self.config = cfg = config
        self.prompt_source = wiring.make_prompt_source(cfg, prompt_source)
        self.accelerator = wiring.make_accelerator(cfg)
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        set_seed(cfg.seed)  # LoRA init and anything else drawing from the global RNGs

        self.pipeline = model if wiring.is_pipeline(model) else None
        if self.pipeline is not None:
            model = wiring.adapter_from_pipeline(model, cfg, self.device)
        elif hasattr(model, "to") and callable(model.to):
            model.to(self.device)
        self.model = model
        self.prompt_encoder = wiring.make_prompt_encoder(prompt_encoder, self.pipeline, model, cfg, self.device)
        self._precompute_prompts()  # before LoRA/upcasting/sharding: the text encoders leave memory first
        self.reward = reward if reward is not None else wiring.build_reward(cfg, self.device)
        self.objective = objective if objective is not None else wiring.build_objective(cfg, self.reward)

        self.network = wiring.network_of(model)
        self.state_module = wiring.setup_trainable(cfg, model, self.network, self.pipeline)
        wiring.apply_leapkernels(cfg, self.network)
        self.distributed = wiring.resolve_distributed(cfg, self.accelerator)
        if self.distributed == "fsdp":
            wiring.apply_fsdp(cfg, self.network)
        # the rollout engine (rollout_compile): compiled lazily, so it compiles the LoRA'd, patched, sharded network
        self.rollout_engine = cfg.rollout_engine(model, self.distributed, self.device)
        logger.info("rollout engine: compile=%s (rollout_compile=%s), grad steps %s", self.rollout_engine.compile,
                    cfg.rollout_compile, self.rollout_engine.grad_steps)  # a compiled run is not bit-comparable to an eager one
        self.rollout = wrap_rollout(model, self.rollout_engine)
        mixed = cfg.mixed_precision != "no"
        self._rollout_model = wiring.VelocityInInputDtype(self.rollout) if mixed else self.rollout
        # sample grids run eagerly: their batch is another shape, whose compile a few grids never repay
        self._sample_model = wiring.VelocityInInputDtype(model) if mixed else model
        self.param_names, self.params = wiring.trainable_parameters(self.state_module)
        if self.distributed == "ddp":
            wiring.broadcast_parameters(self.params)
        self.optimizer, self.lr_scheduler = wiring.make_optimizer(cfg, self.params)
        self.ema = wiring.make_ema(cfg, self.params)
        self.step = self.nonfinite_in_row = self.nonfinite_total = 0
        self.last_metrics: dict[str, float] = {}
        self.run_id = uuid.uuid4().hex[:12]  # the output folder's run id replaces it in train()
        self._last_saved_step: int | None = None
        self._last_saved_path: Path | None = None
        self._last_sample_step: int | None = None

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

    def _micro_batch_loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        prompts = self.micro_batch_prompts(step, micro)
        cond = self.prompt_encoder.encode(prompts)
        try:
            with self.accelerator.autocast():
                out = self.objective(self._rollout_model, cond, prompts, self.reward, generator=self.micro_batch_generator(step, micro))
        except RewardNotDifferentiableError as exc:
            raise RewardGradientError(f"step {step + 1}: {self._reward_name()}: {exc}") from None
        loss = out.loss
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise RuntimeError(f"the objective must return a scalar loss tensor, got {loss!r}")
        if not loss.requires_grad:
            raise RewardGradientError(
                f"step {step + 1}: the loss has no gradient: {self._reward_name()} returned values detached from the "
                "images (torch.no_grad, .detach(), .item() or numpy); a reward must be differentiable torch ops on the images"
            )
        return loss, {**out.metrics, **getattr(self.reward, "last_components", {})}

    def _reward_name(self) -> str:
        terms = getattr(self.reward, "terms", None)  # a CompositeReward built from reward_specs
        name = ", ".join(t.name for t in terms) if terms else getattr(self.reward, "__name__", type(self.reward).__name__)
        return f"the reward ({name})"

    def compute_gradients(self, step: int) -> tuple[bool, dict[str, float]]:
        """Forward + backward over the step's micro-batches, gradients synchronised across ranks.

        ``step`` is 0-based (the number of steps done before it). Returns ``(finite, metrics)``:
        ``finite`` is False when any rank saw a non-finite loss or the global gradient norm is not
        finite. Every rank always runs every backward (FSDP's collectives must match), even after a NaN.
        """
        accum = self.config.train_gradient_accumulation_steps
        sums: dict[str, float] = {}
        loss_ok = True
        for micro in range(accum):
            loss, metrics = self._micro_batch_loss(step, micro)
            loss_ok &= bool(torch.isfinite(loss.detach()))
            fault_point("mid-step", step + 1)
            (loss / accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        if self.distributed == "ddp":
            self._all_reduce_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros((), device=self.device)
        self._grad_norm = norm
        norm_value = float(checkpointing.full_cpu(norm)) if hasattr(norm, "full_tensor") else float(norm)
        finite = loss_ok and math.isfinite(norm_value)
        if self.world_size > 1:
            finite = self._all_ranks_finite(finite, sums)
        sums["grad_norm"] = norm_value
        return finite, sums

    def _all_ranks_finite(self, finite: bool, sums: dict[str, float]) -> bool:
        """True when every rank's step was finite; averages the logged loss and reward over ranks."""
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        for key in ("loss", "reward_mean"):
            if key in sums:
                t = torch.tensor([sums[key]], device=self.device, dtype=torch.float64)
                torch.distributed.all_reduce(t)
                sums[key] = float(t.item()) / self.world_size
        return bool(flag.item() == 0.0)

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
        """One optimiser step (or one skipped step on a non-finite loss/gradient); advances ``self.step``.

        After ``train_max_nonfinite_steps`` skipped steps in a row it raises
        :class:`NonFiniteLossError`; the step is consumed and ``last_metrics`` describe it.
        """
        cfg = self.config
        finite, metrics = self.compute_gradients(self.step)
        if finite:
            if cfg.train_max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.train_max_grad_norm, self._grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics.update(step=float(self.step), lr=float(self.lr_scheduler.get_last_lr()[0]), skipped=float(not finite),
                       nonfinite_total=float(self.nonfinite_total))
        self.last_metrics = metrics
        if not finite:
            logger.warning(
                "step %d: non-finite loss or gradient (grad_norm=%s); step skipped, weights unchanged "
                "(%d in a row, %d total)", self.step, metrics.get("grad_norm"), self.nonfinite_in_row, self.nonfinite_total,
            )
            if self.nonfinite_in_row >= cfg.train_max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_row} optimiser steps in a row had a NaN/Inf loss or gradient "
                    f"(train_max_nonfinite_steps={cfg.train_max_nonfinite_steps}); stopping at step {self.step}. "
                    "Check the reward for NaNs, lower train_learning_rate, or use mixed_precision=no."
                )
        return metrics

    # ------------------------------------------------------------------------------------------
    # the loop
    def train(self) -> TrainResult:
        """Run until ``train_num_steps``, owning ``output_dir`` meanwhile (resuming first when
        ``ckpt_resume_from`` is set); see :mod:`leapalign.training.run_dir`."""
        cfg = self.config
        # a trainer that already loaded or saved one of this folder's checkpoints continues its run
        continues = cfg.ckpt_resume_from or (str(self._last_saved_path) if self._last_saved_path else None)
        claim = claim_run_dir(cfg.output_dir, continues, cfg.overwrite) if self.is_main else None
        try:
            if claim is not None:
                self.run_id = claim.run_id
            self._resume()
            self._loop()
        finally:
            if claim is not None:
                claim.release()
        return TrainResult(self.step, self.nonfinite_total, dict(self.last_metrics), self._last_saved_path)

    def _resume(self) -> None:
        cfg = self.config
        resume = resolve_resume(cfg.ckpt_resume_from, cfg.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        elif cfg.ckpt_resume_from == "latest":
            logger.warning("ckpt_resume_from=latest: no checkpoint in %s yet; starting fresh at step %d",
                           checkpoint_root(cfg.output_dir), self.step)
        if self.is_main:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(out, self.step)  # the steps after the checkpoint are logged again
            saved = cfg.to_dict() | {"overwrite": False}  # a one-off instruction: rerunning this file must not move the run
            (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        if cfg.log_with:
            self.accelerator.init_trackers(cfg.tracker_project_name, config=_flat_config(cfg))
        progress = tqdm(total=cfg.train_num_steps, initial=self.step, disable=not self.is_main, desc="leapalign")
        try:
            while self.step < cfg.train_num_steps:
                try:
                    metrics = self.training_step()
                except NonFiniteLossError:
                    self._log(self.last_metrics)
                    raise
                progress.update(1)
                progress.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.4f}", loss=f"{metrics.get('loss', float('nan')):.4f}")
                if metrics["skipped"] or self.step % cfg.log_every == 0 or self.step == cfg.train_num_steps:
                    self._log(metrics)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.train_num_steps:
                    self.save_checkpoint()
            if cfg.sample_every and self._last_sample_step != self.step:
                self.save_samples()
            if cfg.ckpt_save_final and self._last_saved_step != self.step:
                self.save_checkpoint()
        finally:
            progress.close()
            if cfg.log_with:
                self.accelerator.end_training()

    def _precompute_prompts(self) -> None:
        """Encode every prompt once, then free the text encoders: they never run again (a
        FluxPromptEncoder, or any encoder with ``precompute``/``release_text_encoders``/``released``)."""
        enc = self.prompt_encoder
        if callable(getattr(enc, "release_text_encoders", None)) and not getattr(enc, "released", True):
            enc.precompute(list(self.prompt_source.prompts) + self._sample_prompts())
            enc.release_text_encoders()

    def _log(self, metrics: dict[str, float]) -> None:
        if self.config.log_with:
            self.accelerator.log(metrics, step=self.step)
        if self.is_main:
            append_metrics(self.config.output_dir, metrics)

    # ------------------------------------------------------------------------------------------
    # samples and checkpoints
    def _sample_prompts(self) -> list[str]:
        cfg = self.config
        prompts = list(cfg.sample_prompts) or list(self.prompt_source.prompts)
        reps = -(-cfg.sample_num_images // len(prompts))
        return (prompts * reps)[: cfg.sample_num_images]

    def save_samples(self) -> Path | None:
        """A PNG grid of ``sample_num_images`` images (EMA weights, fixed seed) in ``output_dir/samples``."""
        from leapalign.sampling import euler_sample, save_image_grid

        cfg = self.config
        self._last_sample_step = self.step
        if not self.is_main and self.distributed != "fsdp":
            return None
        prompts = self._sample_prompts()
        cond = self.prompt_encoder.encode(prompts)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        swap = self.ema.swapped_in() if (self.ema is not None and cfg.sample_use_ema) else contextlib.nullcontext()
        with swap, self.accelerator.autocast():
            images = euler_sample(self._sample_model, cond, len(prompts), cfg.sample_num_steps, gen)
        if not self.is_main:
            return None
        return save_image_grid(images, Path(cfg.output_dir) / "samples" / f"step-{self.step:08d}.png")

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (see :mod:`leapalign.training.checkpointing`); every rank must call it."""
        return checkpointing.save_trainer_checkpoint(self)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser, scheduler, RNG, step and fault counters (every rank)."""
        checkpointing.load_trainer_checkpoint(self, path)


def _flat_config(cfg: LeapAlignConfig) -> dict[str, Any]:
    flat = {}
    for k, v in cfg.to_dict().items():
        flat[k] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return flat

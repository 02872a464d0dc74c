"""Worker for tests/test_distributed.py: the trainer's data-parallel and FSDP2 paths on gloo.

``torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR`` runs, on every rank:

- ``ddp``/LoRA and ``fsdp``/full fine-tune with a deterministic objective (no random draws, the
  loss is a mean over samples), so the gradient of a global batch does not depend on how it is
  split: rank 0 saves the gathered gradients of step 0 and the weights after two optimiser steps;
- ``fsdp``/LoRA with the real LeapAlign objective for one step (several forwards with autograd
  before one backward through sharded blocks), an EMA sample grid and a checkpoint save (gathers
  every shard).

``reference(mode, train_mode, out_dir)`` runs the same thing in one process with the whole batch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leapalign.objectives.base import Objective, ObjectiveOutput  # noqa: E402

PROMPTS = [f"prompt {i}" for i in range(8)]
GLOBAL_BATCH = 4


class DeterministicObjective(Objective):
    """``-mean_b brightness(decode(x_b - 0.7 v(x_b)))`` with ``x_b`` fixed per prompt: a loss with no randomness."""

    def __call__(self, model: Any, cond: Any, prompts: Sequence[str], reward: Any, generator=None) -> ObjectiveOutput:
        x = torch.cat([model.noise(1, torch.Generator().manual_seed(PROMPTS.index(p))) for p in prompts])
        v = model.velocity(x, 0.7, cond)
        images = model.decode(x - 0.7 * v)
        r = reward(images, prompts)
        loss = -r.mean()
        return ObjectiveOutput(loss, r.detach(), images.detach(), {"loss": float(loss.detach()), "reward_mean": float(r.detach().mean())})


class SeededEncoder:
    """Random conditioning that depends only on the prompt (so every split sees the same per-sample inputs)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode(self, prompts: Sequence[str]):
        from leapalign.adapters.flux import FluxConditioning
        from leapalign.models.tiny_flux import random_flux_conditioning

        parts = [random_flux_conditioning(self.model.transformer, 1, generator=torch.Generator().manual_seed(100 + PROMPTS.index(p)),
                                          dtype=torch.float32, device="cpu") for p in prompts]
        return FluxConditioning(torch.cat([c.prompt_embeds for c in parts]), torch.cat([c.pooled_prompt_embeds for c in parts]))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run(mode: str, train_mode: str, out_dir: Path, objective: str = "deterministic", accumulation: int = 1,
        train: bool = True) -> dict[str, Any] | None:
    from leapalign.training.config import LeapAlignConfig
    from leapalign.models.tiny_flux import tiny_flux_velocity_model
    from leapalign.training.trainer import LeapAlignTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_flux_velocity_model("test", with_vae=True)
    cfg = LeapAlignConfig(
        output_dir=str(out_dir / f"{mode}-{train_mode}-{objective}-{accumulation}"), device="cpu", model_dtype="float32",
        prompts=PROMPTS, train_batch_size=GLOBAL_BATCH // world // accumulation, train_gradient_accumulation_steps=accumulation,
        train_distributed=mode, train_mode=train_mode, lora_rank=4,
        train_learning_rate=1e-2, train_num_steps=2 if objective == "deterministic" else 1, train_ema_decay=0.5,
        reward_specs=[{"name": "brightness"}], objective={"num_steps": 3, "hinge_lambda": None},
        ckpt_every=0, ckpt_save_final=mode != "none",
        sample_every=0 if objective == "deterministic" else 1, sample_num_images=2, sample_num_steps=2,
    )
    trainer = LeapAlignTrainer(cfg, model, prompt_encoder=SeededEncoder(model),
                               objective=DeterministicObjective() if objective == "deterministic" else None)
    finite, metrics = trainer.compute_gradients(0)
    grads = {n: _full(p.grad) for n, p in zip(trainer.param_names, trainer.params)}
    trainer.optimizer.zero_grad(set_to_none=True)
    if not train:
        return {"finite": finite, "grads": grads}
    result = trainer.train()
    weights = {n: _full(p) for n, p in zip(trainer.param_names, trainer.params)}
    return {"finite": finite, "grads": grads, "weights": weights, "metrics": result.last_metrics,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "distributed": trainer.distributed}


def resume_fsdp(out_dir: Path) -> dict[str, Any]:
    """Reload the fsdp/LoRA/LeapAlign checkpoint into freshly sharded weights, then train one more step."""
    from leapalign.training.checkpoint_dir import latest_checkpoint
    from leapalign.training.config import LeapAlignConfig
    from leapalign.models.tiny_flux import tiny_flux_velocity_model
    from leapalign.training.trainer import LeapAlignTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = tiny_flux_velocity_model("test", with_vae=True)
    cfg = LeapAlignConfig(
        output_dir=str(out_dir / "fsdp-lora-leapalign-1"), device="cpu", model_dtype="float32", prompts=PROMPTS,
        train_batch_size=GLOBAL_BATCH // world, train_distributed="fsdp", train_mode="lora", lora_rank=4,
        train_learning_rate=1e-2, train_num_steps=2, train_ema_decay=0.5, reward_specs=[{"name": "brightness"}],
        objective={"num_steps": 3, "hinge_lambda": None}, ckpt_every=0, ckpt_save_final=True,
    )
    trainer = LeapAlignTrainer(cfg, model, prompt_encoder=SeededEncoder(model))
    trainer.load_checkpoint(latest_checkpoint(cfg.output_dir))
    loaded = {n: _full(p) for n, p in zip(trainer.param_names, trainer.params)}
    loaded_ema = {n: _full(s) for n, s in zip(trainer.param_names, trainer.ema.shadow)}
    step = trainer.step
    result = trainer.train()
    return {"loaded": loaded, "loaded_ema": loaded_ema, "loaded_step": step, "step": result.step,
            "metrics": result.last_metrics}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    results = {
        "ddp-lora": run("ddp", "lora", out),
        "fsdp-full": run("fsdp", "full", out),
        "fsdp-lora-leapalign": run("fsdp", "lora", out, objective="leapalign"),
    }
    results["fsdp-resume"] = resume_fsdp(out)
    if rank == 0:
        torch.save(results, out / "dist_results.pt")


if __name__ == "__main__":
    main(sys.argv[1])

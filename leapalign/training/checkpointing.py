"""What a checkpoint holds, and how a trainer writes it, reads it back and exports its weights.

Layout of ``<output_dir>/checkpoints/step-NNNNNNNN/`` (the folder itself is made atomically by
:mod:`leapalign.training.checkpoint_dir`)::

    trainer_state.json       step, fault counters, world size, run id, the config
    trainable.safetensors    the raw trainable weights (full tensors, gathered under FSDP)
    ema.safetensors          their EMA (when EMA is on)
    optimizer.pt             AdamW state (full, keyed like the optimiser's own state_dict)
    scheduler.pt             LR scheduler state
    rng.pt                   torch / CUDA / numpy / python RNG state of every rank, as tensors
    lora/                    diffusers-format LoRA (EMA weights) -- the family pipeline's load_lora_weights reads it
    transformer/             or, for full fine-tunes: config.json + diffusion_pytorch_model.safetensors (EMA)

Safety: every ``.pt`` file holds only tensors and plain Python data and is read with
``torch.load(weights_only=True)``, so a checkpoint someone shared cannot run code when resumed;
a file that needs more is refused with a :class:`CheckpointError`.
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leapalign.training.checkpoint_dir import prune_checkpoints, read_trainer_state, write_checkpoint
from leapalign.training.errors import CheckpointError
from leapalign.training.faults import fault_point

#: The functions below take a ``LeapAlignTrainer`` (not imported: the trainer imports this module).
LeapAlignTrainer = Any

__all__ = [
    "full_cpu", "assign_full", "laid_out_like", "safe_load", "capture_rng_state", "restore_rng_state",
    "save_trainer_checkpoint", "load_trainer_checkpoint",
]

logger = logging.getLogger("leapalign.trainer")


# ---------------------------------------------------------------------------------------------
# DTensor-aware tensor moves
def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``t``; DTensor shards are gathered (a collective: every rank calls it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def laid_out_like(ref: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref``: on its device and dtype, sharded when ``ref`` is a DTensor."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
    return full.to(ref.device, ref.dtype)


def assign_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``dst``, slicing it into ``dst``'s shard when ``dst`` is a DTensor."""
    with torch.no_grad():
        dst.copy_(laid_out_like(dst, full))


# ---------------------------------------------------------------------------------------------
# safe files
def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; anything beyond tensors and plain data is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it names {found.group(1)}" if found else "not plain data"
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds pickled objects, not only tensors and plain data "
            f"({reason}); loading it could run code -- it was not written by this leapalign or was altered"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {' '.join(str(exc).split())}") from exc


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may touch (torch CPU, CUDA, numpy, python, named generators),
    as tensors and plain data only (so ``weights_only=True`` reads it back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for key, gen in (generators or {}).items():
        state[f"generator/{key}"] = gen.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, gen in (generators or {}).items():
        if f"generator/{key}" in state:
            gen.set_state(state[f"generator/{key}"])


# ---------------------------------------------------------------------------------------------
# a trainer's checkpoint
def _gather(trainer: LeapAlignTrainer) -> dict[str, Any]:
    """Everything a checkpoint holds, as full CPU tensors (collectives: every rank calls this)."""
    cfg = trainer.config
    trainable = {n: full_cpu(p) for n, p in zip(trainer.param_names, trainer.params)}
    optim = trainer.optimizer.state_dict()
    optim["state"] = {k: {sk: full_cpu(sv) if isinstance(sv, torch.Tensor) else sv for sk, sv in st.items()}
                      for k, st in optim["state"].items()}
    rng = [capture_rng_state()]
    if trainer.world_size > 1:
        rng = [None] * trainer.world_size
        torch.distributed.all_gather_object(rng, capture_rng_state())
    return {
        "trainable": trainable,
        "ema": {n: full_cpu(s) for n, s in zip(trainer.param_names, trainer.ema.shadow)} if trainer.ema else None,
        "optim": optim,
        "rng": rng,
        "full_weights": ({k: full_cpu(v) for k, v in trainer.network.state_dict().items()}
                         if cfg.train_mode == "full" and trainer.network is not None else None),
    }


def save_trainer_checkpoint(trainer: LeapAlignTrainer) -> Path | None:
    """Write a resumable checkpoint of ``trainer`` (every rank calls it; rank 0 writes)."""
    from safetensors.torch import save_file

    cfg, step = trainer.config, trainer.step
    parts = _gather(trainer)
    path = None
    if trainer.is_main:
        state = {
            "step": step, "nonfinite_in_row": trainer.nonfinite_in_row, "nonfinite_total": trainer.nonfinite_total,
            "world_size": trainer.world_size, "train_mode": cfg.train_mode, "run_id": trainer.run_id,
            "param_names": trainer.param_names, "param_shapes": [list(t.shape) for t in parts["trainable"].values()],
            "config": cfg.to_dict(),
        }

        def write(tmp: Path) -> None:
            save_file(parts["trainable"], str(tmp / "trainable.safetensors"))
            if parts["ema"] is not None:
                save_file(parts["ema"], str(tmp / "ema.safetensors"))
            fault_point("mid-save", step)
            torch.save(parts["optim"], tmp / "optimizer.pt")
            torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(parts["rng"], tmp / "rng.pt")
            weights = parts["ema"] if parts["ema"] is not None else parts["trainable"]
            _export_weights(trainer, tmp, weights, parts["full_weights"])
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

        path = write_checkpoint(cfg.output_dir, step, write, run_id=trainer.run_id)
        prune_checkpoints(cfg.output_dir, cfg.ckpt_keep_last, run_id=trainer.run_id)
    trainer._last_saved_step, trainer._last_saved_path = step, path
    trainer.accelerator.wait_for_everyone()
    return path


def _network_prefix(trainer: LeapAlignTrainer) -> str:
    """The network's name inside the module that names the trainable weights (``""`` when it is that module)."""
    if trainer.network is None or trainer.network is trainer.state_module:
        return ""
    for name, mod in trainer.state_module.named_modules():
        if mod is trainer.network:
            return name + "."
    return ""


def _export_weights(trainer: LeapAlignTrainer, tmp: Path, weights: dict[str, torch.Tensor],
                    full_weights: dict[str, torch.Tensor] | None) -> None:
    """The deliverable: diffusers-format LoRA, or the full network as safetensors (EMA weights)."""
    from safetensors.torch import save_file

    net, prefix = trainer.network, _network_prefix(trainer)
    if trainer.config.train_mode == "lora" and net is not None and hasattr(net, "peft_config"):
        import diffusers
        from peft.utils import get_peft_model_state_dict

        from leapalign.training.wiring import network_family

        local = {n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)}
        lora = get_peft_model_state_dict(net, state_dict=local)
        meta = net.peft_config["default"].to_dict()
        family = network_family(net)  # the family's own pipeline writes its format; FLUX.1's for a custom network
        pipeline = getattr(diffusers, family.pipelines[0] if family is not None else "FluxPipeline")
        pipeline.save_lora_weights(tmp / "lora", transformer_lora_layers=lora, safe_serialization=True,
                                       transformer_lora_adapter_metadata=meta)
    elif full_weights is not None:
        merged = dict(full_weights)
        for n, t in weights.items():
            if n.startswith(prefix) and n[len(prefix):] in merged:
                merged[n[len(prefix):]] = t.to(merged[n[len(prefix):]].dtype)
        (tmp / "transformer").mkdir()
        save_file(merged, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"))
        if hasattr(net, "save_config"):
            net.save_config(tmp / "transformer")


def _check_compatible(trainer: LeapAlignTrainer, path: Path, state: dict[str, Any]) -> None:
    cfg = trainer.config
    if state.get("train_mode") != cfg.train_mode:
        raise CheckpointError(f"{path} was trained with train_mode={state.get('train_mode')!r}, config says {cfg.train_mode!r}")
    shapes = [list(p.shape) for p in trainer.params]  # a DTensor's shape is the global one
    if state.get("param_names") != trainer.param_names or state.get("param_shapes", shapes) != shapes:
        raise CheckpointError(f"{path} holds different trainable parameters than this model (LoRA targets/rank or model changed)")
    if trainer.ema is not None and not (path / "ema.safetensors").is_file():
        raise CheckpointError(f"{path} has no ema.safetensors but train_ema_decay > 0")


def load_trainer_checkpoint(trainer: LeapAlignTrainer, path: str | Path) -> None:
    """Restore weights, EMA, optimiser, scheduler, RNG, step and fault counters (every rank)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_trainer_state(path)
    _check_compatible(trainer, path, state)
    optim, sched, rng = (safe_load(path / name) for name in ("optimizer.pt", "scheduler.pt", "rng.pt"))
    trainable = load_file(str(path / "trainable.safetensors"))
    for n, p in zip(trainer.param_names, trainer.params):
        assign_full(p, trainable[n])
    if trainer.ema is not None:
        ema = load_file(str(path / "ema.safetensors"))
        for n, s in zip(trainer.param_names, trainer.ema.shadow):
            assign_full(s, ema[n])
    for k, st in optim["state"].items():
        ref = trainer.params[int(k)]
        optim["state"][k] = {sk: (laid_out_like(ref, sv) if isinstance(sv, torch.Tensor) and sv.shape == ref.shape else sv)
                             for sk, sv in st.items()}
    trainer.optimizer.load_state_dict(optim)
    trainer.lr_scheduler.load_state_dict(sched)
    if len(rng) != trainer.world_size:
        logger.warning("checkpoint was written by %d process(es), resuming on %d: RNG states reused by rank", len(rng), trainer.world_size)
    restore_rng_state(rng[trainer.rank % len(rng)])
    trainer.step = int(state["step"])
    trainer.nonfinite_in_row = int(state["nonfinite_in_row"])
    trainer.nonfinite_total = int(state["nonfinite_total"])
    trainer._last_saved_step = trainer.step
    trainer._last_saved_path = path
    logger.info("resumed from %s at step %d", path, trainer.step)

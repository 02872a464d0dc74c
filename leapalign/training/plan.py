"""``leapalign plan``: memory per GPU and time of a training config on the real architecture, no GPU.

:func:`plan` builds the configured transformer, VAE and reward model from their ``config.json``
files only (:mod:`~leapalign.training.plan_models`) under ``FakeTensorMode`` (shapes, no data, no
memory), wires them as the trainer does (:mod:`~leapalign.training.plan_setup`) and runs ONE real
training micro-batch plus optimiser step through the project's own code -- adapter, objective,
leapkernels patch, LoRA or full weights, gradient checkpointing, VAE decode, reward, backward, AdamW,
EMA -- accounted by PyTorch's ``MemTracker`` / ``FSDPMemTracker`` and ``FlopCounterMode``
(:mod:`~leapalign.training.plan_trace`). ``world_size > 1`` plans the trainer's FSDP2 sharding with
a fake process group; the figures are per rank.

What differs from a GPU run, by construction (each said in the report's notes):

- tensors are fake *CPU* tensors (a CPU-only torch cannot fake CUDA tensors with autograd): PyTorch
  picks the CPU flash-attention kernel, which saves what CUDA flash attention saves (output +
  log-sum-exp); bf16 autocast uses the CPU autocast op lists;
- leapkernels' fused ops run their PyTorch reference backend: each op's ``autograd.Function`` is
  the same whichever backend runs the arithmetic, so the bytes saved for backward are the fused
  kernels' own; fused elementwise ops count no FLOPs either way (``FlopCounterMode`` counts matmuls,
  convolutions and attention);
- the no-grad rollout steps after the first are not run: each counts the first one's FLOPs and
  memory transient (a no-grad step keeps nothing, so its cost depends on shapes only);
- naive BPTT (``full_backprop``, every step with grad) is planned at T = 3 and T = 4 and extrapolated
  linearly to the configured T: each further step adds the same shapes, so bytes and FLOPs are
  exactly linear in T (proven against full traces in ``tests/test_plan_extrapolation.py``);
- AdamW runs its single-tensor implementation on fake tensors; on CUDA PyTorch defaults to the
  ``foreach`` one, whose step temporaries (one copy of the largest state list) this plan does not see.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from leapalign.training.gpus import GPUS, gpu_named, usable_bytes
from leapalign.training.plan_models import ModelSpec, PlanError, model_spec

__all__ = ["PlanError", "PlanReport", "plan", "main", "MEMORY_SIZES"]

#: The memory sizes every report answers for: GPU name -> its memory (24, 48, 80 and 141 GB parts).
MEMORY_SIZES = {"24GB": "RTX-4090", "48GB": "L40S", "80GB": "H100-SXM", "141GB": "H200"}


@dataclass
class PlanReport:
    """One planned configuration; bytes and FLOPs are per GPU (per rank under FSDP2)."""

    model: str
    method: str
    height: int
    width: int
    train_mode: str
    lora_rank: int | None
    world_size: int
    batch_size: int
    grad_accumulation: int
    num_steps: int
    train_num_steps: int
    leapkernels: bool
    gradient_checkpointing: bool
    mixed_precision: str
    gpu: str
    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    saved_bytes: int
    flops: dict[str, int]
    flops_per_iteration: int
    weight_traffic_bytes: int
    roofline_s: dict[str, float]
    run_roofline_s: dict[str, float]
    fits: bool
    fits_by_memory: dict[str, bool]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The human-readable answer ``leapalign plan`` prints."""
        from leapalign.training.plan_text import format_report

        return format_report(self)


def _method_name(cfg: Any, kernels: bool) -> str:
    name = cfg.objective_name
    if name == "full_backprop":
        name = "bptt_ckpt" if cfg.objective.get("checkpoint") else "bptt"
    return f"{name}+kernels" if kernels else name


def _uses_kernels(cfg: Any) -> bool:
    return bool(cfg.model_use_leapkernels) or cfg.model_use_leapkernels is None


def _fake_process_group(world_size: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("a torch.distributed process group already exists in this process; plan in a fresh one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def _trace(cfg: Any, spec: ModelSpec, world_size: int, notes: list[str]):
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leapalign.training.plan_setup import build_setup
    from leapalign.training.plan_trace import trace_iteration
    from leapkernels.backend import force_backend

    if world_size > 1:
        _fake_process_group(world_size)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), force_backend("reference"), torch.device("cpu"):
            setup = build_setup(cfg, spec, world_size=world_size, notes=notes)
            return trace_iteration(setup), setup
    finally:
        if world_size > 1:
            dist.destroy_process_group()


#: Objectives whose every sampling step runs with grad, and the two step counts they are planned at.
LINEAR_IN_STEPS = frozenset({"full_backprop"})
EXTRAPOLATE_FROM = (3, 4)  # at T = 2 the peak falls at another moment of backward (measured on the tiny models)


def _linear(a: Any, b: Any, t: int, t1: int, t2: int) -> Any:
    """The value at ``t`` of the line through ``(t1, a)`` and ``(t2, b)``, for ints and dicts of ints (exact)."""
    if isinstance(a, dict):
        return {k: _linear(a.get(k, 0), b.get(k, 0), t, t1, t2) for k in {**a, **b}}
    step, rem = divmod(b - a, t2 - t1)
    if rem:
        raise PlanError(f"not linear in T: {a} at T={t1}, {b} at T={t2}")
    return b + (t - t2) * step


def _trace_steps(cfg: Any, spec: ModelSpec, world_size: int, notes: list[str]):
    """:func:`_trace`, or for objectives in :data:`LINEAR_IN_STEPS` two short traces extrapolated to T."""
    steps = int(cfg.objective.get("num_steps", 25))
    t1, t2 = EXTRAPOLATE_FROM
    if cfg.objective_name not in LINEAR_IN_STEPS or steps <= t2:
        return _trace(cfg, spec, world_size, notes)
    setup_notes: list[str] = []
    (a, _), (b, setup) = (_trace(_changed(cfg, objective={**cfg.objective, "num_steps": n}), spec, world_size, out)
                          for n, out in ((t1, []), (t2, setup_notes)))
    same_moment = a.peak_phase == b.peak_phase and all(
        a.breakdown[k] == b.breakdown[k] for k in a.breakdown if k != "activations")
    if not same_moment:  # only the held activations may grow with T; otherwise trace every step
        notes.append("every step runs with grad: the short traces peaked at different moments, so all T steps were traced")
        return _trace(cfg, spec, world_size, notes)
    trace = replace(b, **{name: _linear(getattr(a, name), getattr(b, name), steps, t1, t2)
                          for name in ("peak_bytes", "breakdown", "saved_bytes", "saved_by_dtype", "flops", "calls")})
    notes.extend(setup_notes)
    notes.append(f"every step runs with grad: planned at T = {t1} and T = {t2}, extrapolated linearly to T = {steps}")
    return trace, setup


def _roofline(flops: int, traffic: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    per_iteration = {name: max(flops / g.bf16_flops, traffic / g.bandwidth) for name, g in GPUS.items()}
    return per_iteration, {name: s * steps for name, s in per_iteration.items()}


def _plan_once(cfg: Any, spec: ModelSpec, gpu: str, world_size: int) -> PlanReport:
    start = time.perf_counter()
    notes = list(spec.notes)
    trace, setup = _trace_steps(cfg, spec, world_size, notes)
    accum = cfg.train_gradient_accumulation_steps
    calls = trace.calls
    passes = calls.get("nograd", 0) + calls.get("grad", 0) * (2 + int(cfg.model_gradient_checkpointing))
    traffic = setup.weight_bytes * passes * accum  # weights read once per forward, backward and recompute
    per_iter = trace.total_flops * accum
    roof, run = _roofline(per_iter, traffic, cfg.train_num_steps)
    fits_by = {size: trace.peak_bytes <= usable_bytes(GPUS[name].memory_bytes) for size, name in MEMORY_SIZES.items()}
    kernels = _uses_kernels(cfg)
    if kernels:
        notes.append("leapkernels patch on: planned with the reference backend (the fused ops save the same bytes)")
    if calls.get("nograd_skipped"):
        notes.append(f"{calls['nograd_skipped']} no-grad rollout steps counted from the first one (not run)")
    return PlanReport(
        model=spec.name, method=_method_name(cfg, kernels), height=cfg.model_height, width=cfg.model_width,
        train_mode=cfg.train_mode, lora_rank=cfg.lora_rank if cfg.train_mode == "lora" else None,
        world_size=world_size, batch_size=cfg.train_batch_size, grad_accumulation=accum,
        num_steps=int(cfg.objective.get("num_steps", 25)), train_num_steps=cfg.train_num_steps, leapkernels=kernels,
        gradient_checkpointing=cfg.model_gradient_checkpointing, mixed_precision=cfg.mixed_precision, gpu=gpu,
        peak_bytes=trace.peak_bytes, peak_phase=trace.peak_phase, breakdown=trace.breakdown,
        saved_bytes=trace.saved_bytes, flops=trace.flops, flops_per_iteration=per_iter, weight_traffic_bytes=traffic,
        roofline_s=roof, run_roofline_s=run, fits=trace.peak_bytes <= usable_bytes(GPUS[gpu].memory_bytes),
        fits_by_memory=fits_by, notes=notes, plan_seconds=round(time.perf_counter() - start, 1),
    )


def _changed(cfg: Any, **changes: Any) -> Any:
    return type(cfg).from_dict({**cfg.to_dict(), **changes})


def _candidates(cfg: Any, world_size: int) -> list[tuple[str, Any, int]]:
    """Changes that lower the peak, cheapest first: memory-only knobs, then ones that change the run."""
    out: list[tuple[str, Any, int]] = []
    if not cfg.model_gradient_checkpointing:
        out.append(("model_gradient_checkpointing: true", _changed(cfg, model_gradient_checkpointing=True), world_size))
    if cfg.model_use_leapkernels is False:
        out.append(("model_use_leapkernels: true", _changed(cfg, model_use_leapkernels=True), world_size))
    if cfg.train_batch_size > 1:
        accum = cfg.train_gradient_accumulation_steps * cfg.train_batch_size
        out.append((f"train_batch_size: 1, train_gradient_accumulation_steps: {accum} (same global batch)",
                    _changed(cfg, train_batch_size=1, train_gradient_accumulation_steps=accum), world_size))
    for n in (2, 4, 8, 16, 32):
        if n > world_size:
            out.append((f"--world-size {n} (FSDP2, train_distributed: fsdp)", cfg, n))
    if cfg.train_mode == "full":
        out.append(("train_mode: lora, lora_rank: 64", _changed(cfg, train_mode="lora", lora_rank=64), world_size))
    elif cfg.lora_rank > 8:
        out.append((f"lora_rank: {cfg.lora_rank // 2}", _changed(cfg, lora_rank=cfg.lora_rank // 2), world_size))
    if cfg.model_height > 512 or cfg.model_width > 512:
        out.append(("model_height: 512, model_width: 512", _changed(cfg, model_height=512, model_width=512), world_size))
    return out


def _suggest(cfg: Any, spec: ModelSpec, gpu: str, world_size: int, limit: int) -> list[dict[str, Any]]:
    """Re-plan the candidates in order until two fit (or ``limit`` re-plans); FSDP sizes stop at the first fit."""
    found: list[dict[str, Any]] = []
    tried, fsdp_fit = 0, False
    for label, changed, n in _candidates(cfg, world_size):
        if tried >= limit or len(found) >= 2 or (fsdp_fit and n != world_size):
            continue
        tried += 1
        report = _plan_once(changed, spec, gpu, n)
        entry = {"change": label, "peak_bytes": report.peak_bytes, "fits": report.fits,
                 "roofline_s": report.roofline_s[gpu]}
        if report.fits:
            found.append(entry)
            fsdp_fit = fsdp_fit or n != world_size
    return found


def plan(config: Any, gpu: str = "H100-SXM", world_size: int | None = None, *, model: str | ModelSpec | None = None,
         suggest: bool = True, suggest_limit: int = 4) -> PlanReport:
    """Plan ``config`` (a :class:`~leapalign.training.config.LeapAlignConfig`) on ``gpu``.

    ``world_size``: FSDP2 ranks (default: 1, or 8 when the config asks for ``train_distributed:
    fsdp``); ``model``: a :class:`ModelSpec`, ``"tiny:NAME"`` or a folder (default: the config's
    ``model_path``, or the built-in FLUX.1-dev). When the plan does not fit, up to
    ``suggest_limit`` cheaper variants are re-planned and the ones that fit are listed.
    Raises :class:`PlanError` on input it cannot plan.
    """
    gpu_name = _gpu(gpu)
    if world_size is None:
        world_size = 8 if config.train_distributed == "fsdp" else 1
    if not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size={world_size!r} is invalid: expected an integer >= 1")
    spec = model if isinstance(model, ModelSpec) else model_spec(model if model is not None else config.model_path,
                                                                 config.model_max_sequence_length)
    report = _plan_once(config, spec, gpu_name, world_size)
    if suggest and not report.fits:
        report.suggestions = _suggest(config, spec, gpu_name, world_size, suggest_limit)
    return report


def _gpu(name: str) -> str:
    try:
        return gpu_named(name).name
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``leapalign plan CONFIG.yaml [--key value ...] [--gpu NAME] [--world-size N] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="leapalign plan", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="training config (.yaml/.toml), as for leapalign train")
    parser.add_argument("--gpu", default="H100-SXM", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--world-size", type=int, default=None, help="FSDP2 ranks (default: 8 for train_distributed: fsdp, else 1)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument("--no-suggest", action="store_true", help="do not re-plan cheaper variants when it does not fit")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from leapalign.training.config import LeapAlignConfig

        cfg = LeapAlignConfig.from_file(args.config, overrides)
        report = plan(cfg, args.gpu, args.world_size, suggest=not args.no_suggest)
    except (PlanError, ValueError, OSError) as exc:
        print(f"leapalign plan: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

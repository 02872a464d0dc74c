"""The text ``leapalign plan`` prints for a :class:`~leapalign.training.plan.PlanReport`."""
from __future__ import annotations

from typing import Any

from leapalign.training.gpus import GIB, GPUS, usable_bytes

__all__ = ["format_report", "gib", "tflop"]

_PHASE_LABELS = {"rollout": "rollout (no-grad steps)", "grad_steps": "grad-enabled steps", "backward": "backward",
                 "decode_reward": "decode + reward", "objective": "objective glue", "optimizer": "optimizer", "ema": "EMA"}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def tflop(n: float) -> str:
    return f"{n / 1e12:.1f} TFLOP"


def _duration(s: float) -> str:
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def format_report(r: Any) -> str:
    mode = f"LoRA rank {r.lora_rank}" if r.train_mode == "lora" else "full fine-tune"
    lines = [
        f"{r.model}, {r.method}, {r.height}x{r.width}, T={r.num_steps}, {mode}, batch {r.batch_size} x {r.grad_accumulation} "
        f"accumulation, {'FSDP2 x ' + str(r.world_size) if r.world_size > 1 else 'one GPU'}, "
        f"checkpointing {'on' if r.gradient_checkpointing else 'off'}, leapkernels {'on' if r.leapkernels else 'off'}, "
        f"mixed precision {r.mixed_precision}",
        "",
        f"peak memory per GPU: {gib(r.peak_bytes)} (in {r.peak_phase})",
    ]
    lines += [f"  {k:<12} {gib(v)}" for k, v in r.breakdown.items()]
    lines.append(f"  saved for backward over the micro-batch: {gib(r.saved_bytes)}")
    lines += ["", f"FLOPs per micro-batch: {tflop(sum(r.flops.values()))}"]
    lines += [f"  {_PHASE_LABELS.get(k, k):<24} {tflop(v)}" for k, v in r.flops.items() if v]
    lines += ["", f"roofline floor per iteration ({tflop(r.flops_per_iteration)}, weights read {gib(r.weight_traffic_bytes)}) "
              f"and for {r.train_num_steps} steps, per GPU:"]
    for name, gpu in GPUS.items():
        fit = "fits" if r.peak_bytes <= usable_bytes(gpu.memory_bytes) else "does not fit"
        lines.append(f"  {name:<10} {_duration(r.roofline_s[name]):>9} / iteration  {_duration(r.run_roofline_s[name]):>9} / run"
                     f"   ({gib(gpu.memory_bytes)}: {fit})")
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    lines += ["", f"verdict on {r.gpu}: {verdict} ({gib(r.peak_bytes)} of {gib(usable_bytes(GPUS[r.gpu].memory_bytes))} usable)"]
    for s in r.suggestions:
        lines.append(f"  fits with {s['change']}: {gib(s['peak_bytes'])}, floor {_duration(s['roofline_s'])} / iteration")
    if not r.fits and not r.suggestions:
        lines.append("  no re-planned change fitted (try --world-size, a LoRA rank or a smaller resolution)")
    if r.notes:
        lines += ["", "notes:", *[f"  - {n}" for n in r.notes]]
    lines.append(f"\n(planned in {r.plan_seconds:.0f} s on fake tensors; `leapalign plan --json PATH` writes all figures)")
    return "\n".join(lines)

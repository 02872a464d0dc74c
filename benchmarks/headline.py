"""The issue's headline ratios, computed from records measured side by side in one run.

- memory: LeapAlign saved bytes at the largest T / at the smallest T (target <= 1.05) and naive
  BPTT / LeapAlign saved bytes at the largest T (target >= 20).
- throughput (issue 15), LeapAlign as the trainer runs it by default (leapkernels, compiled rollout):
  LeapAlign iteration / no-grad sampling (target <= 0.9), naive BPTT / LeapAlign (>= 3), BPTT with
  per-step checkpointing / LeapAlign (>= 5), each at T = 25; the same for eager LeapAlign, and the
  compile time with the iterations it takes to pay for itself.
A ratio is None when one of its records is missing or did not finish (OOM, error).
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["memory_headline", "throughput_headline", "lookup"]


def lookup(records: Sequence[dict[str, Any]], method: str, steps: int, key: str) -> float | None:
    """``records[method, steps][key]`` for a finished record, else None."""
    for rec in records:
        if rec.get("method") == method and rec.get("steps") == steps and rec.get("status") == "ok":
            value = rec.get(key)
            return None if value is None else float(value)
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def memory_headline(records: Sequence[dict[str, Any]], steps: Sequence[int]) -> dict[str, Any]:
    lo, hi = min(steps), max(steps)
    out: dict[str, Any] = {}
    for method in ("leapalign", "leapalign+kernels"):
        out[f"{method}_saved_T{hi}_over_T{lo}"] = _ratio(
            lookup(records, method, hi, "saved_bytes"), lookup(records, method, lo, "saved_bytes"))
    out[f"bptt_over_leapalign_saved_T{hi}"] = _ratio(
        lookup(records, "bptt", hi, "saved_bytes"), lookup(records, "leapalign", hi, "saved_bytes"))
    out[f"bptt_over_leapalign_peak_T{hi}"] = _ratio(
        lookup(records, "bptt", hi, "peak_bytes"), lookup(records, "leapalign", hi, "peak_bytes"))
    out[f"leapalign_over_kernels_saved_T{hi}"] = _ratio(
        lookup(records, "leapalign", hi, "saved_bytes"), lookup(records, "leapalign+kernels", hi, "saved_bytes"))
    out["targets"] = {f"leapalign_saved_T{hi}_over_T{lo}": "<= 1.05", f"bptt_over_leapalign_saved_T{hi}": ">= 20"}
    return out


DEFAULT_ROLLOUT = ("leapalign+kernels+compiled", "leapalign+kernels", "leapalign")
"""LeapAlign as the trainer runs it by default (patched, compiled rollout), then the fallbacks a run
without those methods measured; the headline names the one it used."""


def throughput_headline(records: Sequence[dict[str, Any]], steps: Sequence[int], at: int = 25) -> dict[str, Any]:
    t = at if at in steps else max(steps)
    secs = lambda method, key="seconds": lookup(records, method, t, key)  # noqa: E731
    default = next((m for m in DEFAULT_ROLLOUT if secs(m) is not None), "leapalign")
    out: dict[str, Any] = {
        "default_rollout_method": default,
        f"leapalign_over_sampling_time_T{t}": _ratio(secs(default), secs("sampling")),
        f"bptt_over_leapalign_time_T{t}": _ratio(secs("bptt"), secs(default)),
        f"bptt_ckpt_over_leapalign_time_T{t}": _ratio(secs("bptt_ckpt"), secs(default)),
        # Minimum over repeats: on a shared machine interference only ever adds time.
        f"bptt_over_leapalign_time_min_T{t}": _ratio(secs("bptt", "seconds_min"), secs(default, "seconds_min")),
        # the same ratios for eager LeapAlign (the figures before the rollout engine)
        f"leapalign_eager_over_sampling_time_T{t}": _ratio(secs("leapalign"), secs("sampling")),
        f"bptt_over_leapalign_eager_time_T{t}": _ratio(secs("bptt"), secs("leapalign")),
        f"bptt_ckpt_over_leapalign_eager_time_T{t}": _ratio(secs("bptt_ckpt"), secs("leapalign")),
        f"leapalign_over_kernels_time_T{t}": _ratio(secs("leapalign"), secs("leapalign+kernels")),
        f"kernels_over_compiled_time_T{t}": _ratio(secs("leapalign+kernels"), secs("leapalign+kernels+compiled")),
        f"sampling_over_compiled_sampling_time_T{t}": _ratio(secs("sampling"), secs("sampling+compiled")),
        # The most any method that still rolls out T no-grad forwards can win over naive BPTT on this
        # machine and model: BPTT's cost per step (forward with grad + backward) over one no-grad forward.
        f"ceiling_bptt_step_over_nograd_forward_T{t}": _ratio(
            _per(records, "bptt", t, "gradient_s", "grad_calls"), _per(records, default, t, "rollout_s", "rollout_calls")),
        **_payback(secs, t),
        "targets": {f"leapalign_over_sampling_time_T{t}": "<= 0.9", f"bptt_over_leapalign_time_T{t}": ">= 3",
                    f"bptt_ckpt_over_leapalign_time_T{t}": ">= 5"},
    }
    return out


def _payback(secs: Any, t: int) -> dict[str, Any]:
    """The compiled rollout's one-off compile time and the iterations its saving takes to repay it."""
    compile_s = secs("leapalign+kernels+compiled", "compile_s")
    eager, compiled = secs("leapalign+kernels"), secs("leapalign+kernels+compiled")
    saving = None if eager is None or compiled is None else eager - compiled
    payback = compile_s / saving if compile_s is not None and saving is not None and saving > 0 else None
    return {f"compile_s_T{t}": compile_s, f"compile_saving_s_per_iteration_T{t}": saving,
            f"compile_payback_iterations_T{t}": payback}


def _per(records: Sequence[dict[str, Any]], method: str, steps: int, key: str, count: str) -> float | None:
    total, calls = lookup(records, method, steps, key), lookup(records, method, steps, count)
    return None if total is None or not calls else total / calls

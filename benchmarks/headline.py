"""The issue's headline ratios, computed from records measured side by side in one run.

- memory: LeapAlign saved bytes at the largest T / at the smallest T (target <= 1.05) and naive
  BPTT / LeapAlign saved bytes at the largest T (target >= 20).
- throughput: naive BPTT / LeapAlign median iteration time at T = 25 (target >= 4).
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


def throughput_headline(records: Sequence[dict[str, Any]], steps: Sequence[int], at: int = 25) -> dict[str, Any]:
    t = at if at in steps else max(steps)
    out: dict[str, Any] = {
        f"bptt_over_leapalign_time_T{t}": _ratio(
            lookup(records, "bptt", t, "seconds"), lookup(records, "leapalign", t, "seconds")),
        # Minimum over repeats: on a shared machine interference only ever adds time.
        f"bptt_over_leapalign_time_min_T{t}": _ratio(
            lookup(records, "bptt", t, "seconds_min"), lookup(records, "leapalign", t, "seconds_min")),
        f"bptt_ckpt_over_leapalign_time_T{t}": _ratio(
            lookup(records, "bptt_ckpt", t, "seconds"), lookup(records, "leapalign", t, "seconds")),
        f"leapalign_over_kernels_time_T{t}": _ratio(
            lookup(records, "leapalign", t, "seconds"), lookup(records, "leapalign+kernels", t, "seconds")),
        # The most any method that still rolls out T no-grad forwards can win over naive BPTT on this
        # machine and model: BPTT's cost per step (forward with grad + backward) over one no-grad forward.
        f"ceiling_bptt_step_over_nograd_forward_T{t}": _ratio(
            _per(records, "bptt", t, "gradient_s", "grad_calls"), _per(records, "leapalign", t, "rollout_s", "rollout_calls")),
        "targets": {f"bptt_over_leapalign_time_T{t}": ">= 4"},
    }
    return out


def _per(records: Sequence[dict[str, Any]], method: str, steps: int, key: str, count: str) -> float | None:
    total, calls = lookup(records, method, steps, key), lookup(records, method, steps, count)
    return None if total is None or not calls else total / calls

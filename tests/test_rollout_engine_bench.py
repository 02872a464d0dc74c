"""The throughput suite's rollout-engine methods and headline (cheap: no model, no compile)."""
from __future__ import annotations

import pytest

from benchmarks.headline import throughput_headline
from benchmarks.workload import ENGINE_METHODS, METHODS, THROUGHPUT_METHODS, resolve_methods


def _rec(method: str, seconds: float, **extra) -> dict:
    return {"method": method, "steps": 25, "status": "ok", "seconds": seconds, "seconds_min": seconds, **extra}


def test_headline_ratios_use_the_default_rollout_and_report_the_payback():
    records = [
        _rec("leapalign", 0.90), _rec("leapalign+kernels", 0.85),
        _rec("leapalign+kernels+compiled", 0.60, compile_s=30.0, rollout_s=0.46, rollout_calls=23),
        _rec("bptt", 2.4, gradient_s=2.35, grad_calls=25), _rec("bptt_ckpt", 3.6),
        _rec("sampling", 0.75), _rec("sampling+compiled", 0.50),
    ]
    h = throughput_headline(records, [25])
    assert h["default_rollout_method"] == "leapalign+kernels+compiled"
    assert h["leapalign_over_sampling_time_T25"] == pytest.approx(0.60 / 0.75)
    assert h["bptt_over_leapalign_time_T25"] == pytest.approx(2.4 / 0.60)
    assert h["bptt_ckpt_over_leapalign_time_T25"] == pytest.approx(3.6 / 0.60)
    assert h["leapalign_eager_over_sampling_time_T25"] == pytest.approx(0.90 / 0.75)
    assert h["compile_s_T25"] == 30.0 and h["compile_payback_iterations_T25"] == pytest.approx(30.0 / 0.25)
    assert h["ceiling_bptt_step_over_nograd_forward_T25"] == pytest.approx((2.35 / 25) / (0.46 / 23))
    assert h["targets"]["leapalign_over_sampling_time_T25"] == "<= 0.9"


def test_headline_falls_back_to_eager_leapalign_and_says_so():
    h = throughput_headline([_rec("leapalign", 1.0), _rec("bptt", 2.5)], [25])
    assert h["default_rollout_method"] == "leapalign" and h["bptt_over_leapalign_time_T25"] == pytest.approx(2.5)
    assert h["compile_payback_iterations_T25"] is None and h["leapalign_over_sampling_time_T25"] is None


def test_engine_methods_resolve_by_name_but_not_under_all():
    assert not set(ENGINE_METHODS) & set(METHODS)
    assert [m.name for m in resolve_methods(["all"])] == list(METHODS)
    compiled = resolve_methods(["leapalign+kernels+compiled", "sampling+compiled-nographs"])
    assert compiled[0].compile == "default" and compiled[0].kernels and compiled[1].cuda_graphs == "off"
    assert set(THROUGHPUT_METHODS) <= set(METHODS) | set(ENGINE_METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["leapalign+jit"])


def test_cpu_clock_needs_one_thread_on_cpu():
    from benchmarks.throughput import main

    with pytest.raises(ValueError, match="--clock cpu needs --device cpu --threads 1"):
        main(["--clock", "cpu", "--model", "test", "--steps", "3", "--methods", "leapalign"])

"""Naive BPTT is planned at two short T and extrapolated (``leapalign.training.plan``): prove that is exact.

Every step of ``full_backprop`` runs with grad and adds the same shapes, so each byte and FLOP
count is a line in T. The extrapolated plan must equal a full trace at T = 6, field by field.
"""
from __future__ import annotations

import pytest

from leapalign.training import plan as plan_module
from leapalign.training.plan_models import model_spec


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(checkpoint: bool, steps: int = 6, **overrides):
    from leapalign.training.config import LeapAlignConfig

    base = dict(output_dir="/tmp/leapalign-plan-test", prompts=["a red cat"], device="cpu", model_dtype="float32",
                model_path="tiny:test", model_height=16, model_width=16, objective_name="full_backprop",
                objective={"num_steps": steps, "checkpoint": checkpoint}, reward_specs=[{"name": "brightness"}],
                train_mode="lora", lora_rank=4, train_ema_decay=0.9, model_use_leapkernels=False)
    base.update(overrides)
    return LeapAlignConfig(**base)


@pytest.mark.parametrize("checkpoint, overrides", [
    (True, {}),  # per-step checkpointing, LoRA
    (False, {"train_mode": "full", "model_gradient_checkpointing": True}),  # naive, full weights, block checkpointing
], ids=["bptt_ckpt-lora", "bptt-full"])
def test_extrapolated_bptt_equals_the_full_trace(checkpoint, overrides):
    cfg, spec = _cfg(checkpoint, **overrides), model_spec("tiny:test")
    full, _ = plan_module._trace(cfg, spec, 1, [])
    notes: list[str] = []
    extrapolated, _ = plan_module._trace_steps(cfg, spec, 1, notes)
    assert any("extrapolated linearly to T = 6" in n for n in notes), notes
    for name in ("peak_bytes", "peak_phase", "breakdown", "saved_bytes", "saved_by_dtype", "flops", "calls"):
        assert getattr(extrapolated, name) == getattr(full, name), name


def test_short_bptt_and_other_methods_are_traced_in_full():
    notes: list[str] = []
    plan_module._trace_steps(_cfg(False, steps=3), model_spec("tiny:test"), 1, notes)
    assert notes == []
    with pytest.raises(plan_module.PlanError, match="not linear"):
        plan_module._linear(10, 15, 6, 2, 4)

"""``leapalign plan`` proven against a real run on CPU (issue 14, item 4).

For the tiny ``test`` and ``cpu-bench`` Flux models and every method, the plan (fake tensors, the
planner's own wiring, later no-grad steps not run) is compared with a real run: a
:class:`LeapAlignTrainer` built on the same config and real weights, one warm-up step, then its
next micro-batch and optimiser step run through the same accounting on real tensors (every step
run). Bytes saved for backward must be equal to the byte, FLOPs equal, the peak within 10 %.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from leapalign.training.plan_models import ModelSpec, PlanError, model_spec
from leapalign.training.plan_trace import IterationSetup, trace_iteration

METHODS = {
    "leapalign": ("leapalign", {"use_kernels": False}, False),
    "leapalign+kernels": ("leapalign", {"use_kernels": True}, True),
    "drtune": ("drtune", {"k": 2}, False),
    "draft_lv": ("draft_lv", {"n": 2}, False),
    "draft_k": ("draft_k", {"k": 1}, False),
    "refl": ("refl", {}, False),
    "alignprop": ("alignprop", {}, False),
    "bptt": ("full_backprop", {}, False),
    "bptt_ckpt": ("full_backprop", {"checkpoint": True}, False),
}
# every method on cpu-bench takes minutes on a shared 2-core machine: CI runs these two, the rest on request
CPU_BENCH_METHODS = tuple(METHODS) if os.environ.get("LEAPALIGN_PLAN_FULL_PROOF") else ("leapalign+kernels", "bptt_ckpt")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(spec_name: str, method: str, **overrides):
    from leapalign.models.tiny_flux import tiny_flux_spec
    from leapalign.training.config import LeapAlignConfig

    objective, options, kernels = METHODS[method]
    size = max(16, tiny_flux_spec(spec_name).height)  # the config wants multiples of 16 pixels
    base = dict(output_dir="/tmp/leapalign-plan-test", prompts=["a red cat", "a blue dog"], device="cpu",
                model_dtype="float32", model_height=size, model_width=size, objective_name=objective,
                objective={"num_steps": 4, "hinge_lambda": None, **options}, reward_specs=[{"name": "brightness"}],
                train_mode="lora", lora_rank=4, train_ema_decay=0.9, model_use_leapkernels=kernels,
                train_learning_rate=1e-4)
    base.update(overrides)
    return LeapAlignConfig(**base)


class _Encoder:
    def __init__(self, transformer, text_len: int) -> None:
        self.transformer, self.text_len = transformer, text_len

    def encode(self, prompts):
        from leapalign.models.tiny_flux import random_flux_conditioning

        return random_flux_conditioning(self.transformer, len(prompts), text_len=self.text_len,
                                        generator=torch.Generator().manual_seed(0))


def _real_setup(cfg, spec_name: str) -> IterationSetup:
    """A real trainer after one warm-up step, wired for its next micro-batch + step (real tensors)."""
    from leapalign import LeapAlignTrainer
    from leapalign.adapters.flux import FluxVelocityModel
    from leapalign.models.tiny_flux import tiny_flux_spec, tiny_flux_transformer, tiny_flux_vae

    model = FluxVelocityModel(tiny_flux_transformer(spec_name), vae=tiny_flux_vae(spec_name), height=cfg.model_height,
                              width=cfg.model_width, gradient_checkpointing=cfg.model_gradient_checkpointing)
    trainer = LeapAlignTrainer(cfg, model, prompt_encoder=_Encoder(model.transformer, tiny_flux_spec(spec_name).text_len))
    trainer.training_step()
    if cfg.train_gradient_accumulation_steps > 1:  # the step's last micro-batch: earlier ones left gradients
        for p in trainer.params:
            p.grad = torch.zeros_like(p)
    prompts = trainer.micro_batch_prompts(1, 0)
    return IterationSetup(
        model=trainer._rollout_model, network=trainer.network, objective=trainer.objective, reward=trainer.reward,
        cond=trainer.prompt_encoder.encode(prompts), prompts=prompts, optimizer=trainer.optimizer, params=trainer.params,
        ema=trainer.ema, frozen=[model.vae], max_grad_norm=cfg.train_max_grad_norm,
        grad_accumulation=cfg.train_gradient_accumulation_steps, generator=trainer.micro_batch_generator(1, 0),
        autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None,
    )


def _measured(cfg, spec_name: str):
    """A real trainer's second micro-batch + step, every rollout step run, real tensors."""
    return trace_iteration(_real_setup(cfg, spec_name), skip_nograd=False)


def test_counting_flops_does_not_change_the_memory_measured():
    """The FLOP counter must not keep tensors alive: torch's FlopCounterMode tracks modules with grad
    hooks whose handles hold every module output until it exits (2.7x the true peak on cpu-bench)."""
    from leapalign.training.plan_trace import _Iteration, _make_tracker, _optimizer_step

    cfg = _config("cpu-bench", "leapalign", model_gradient_checkpointing=True)
    setup = _real_setup(cfg, "cpu-bench")
    mem = _make_tracker(setup)  # PyTorch's MemTracker, nothing else
    with mem:
        loss = _Iteration()(lambda: setup.objective(setup.model, setup.cond, setup.prompts, setup.reward,
                                                    generator=setup.generator).loss)
        loss.backward()
        del loss
        _optimizer_step(setup)
    bare_peak = sum(dev["Total"] for dev in mem.get_tracker_snapshot("peak").values())
    traced = _measured(cfg, "cpu-bench")
    assert abs(traced.peak_bytes - bare_peak) <= 0.02 * bare_peak, (traced.peak_bytes, bare_peak)


def _planned(cfg, spec_name: str):
    """The plan's own path (fake tensors, reference leapkernels), seeded like the real micro-batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leapalign.training.plan_setup import build_setup
    from leapkernels.backend import force_backend

    seed = int(np.random.SeedSequence([cfg.seed, 1, 0, 0]).generate_state(1)[0])
    with FakeTensorMode(allow_non_fake_inputs=True), force_backend("reference"):
        setup = build_setup(cfg, model_spec(f"tiny:{spec_name}"), generator_seed=seed)
        return trace_iteration(setup)


def _check(spec_name: str, method: str, saved_slack: int = 0, **overrides) -> None:
    """Saved bytes and FLOPs equal, peak within 10 %.

    With leapkernels on, the plan runs the ops' PyTorch references (fake tensors cannot run fused
    kernels); their backward allocates intermediates that the fused kernels (native C++ here, Triton
    on GPU) do not: cpu-bench's plan is ~10.5 % above the native run's peak. So the 10 % is checked
    against a real run on the reference backend too, and the native run must not exceed the plan.
    """
    from leapkernels.backend import force_backend

    cfg = _config(spec_name, method, **overrides)
    planned, measured = _planned(cfg, spec_name), _measured(cfg, spec_name)
    gap = abs(planned.saved_bytes - measured.saved_bytes)
    assert gap <= saved_slack, (planned.saved_by_dtype, measured.saved_by_dtype)
    assert planned.total_flops == measured.total_flops, (planned.flops, measured.flops)
    assert planned.flops["backward"] == measured.flops["backward"]
    if cfg.model_use_leapkernels:
        assert measured.peak_bytes <= planned.peak_bytes, (planned, measured)
        with force_backend("reference"):
            measured = _measured(cfg, spec_name)
    assert abs(planned.peak_bytes - measured.peak_bytes) <= 0.10 * measured.peak_bytes, (planned, measured)


@pytest.mark.parametrize("method", list(METHODS))
def test_plan_matches_real_run_test_model(method):
    _check("test", method)


@pytest.mark.parametrize("method", CPU_BENCH_METHODS)
def test_plan_matches_real_run_cpu_bench(method):
    _check("cpu-bench", method, model_gradient_checkpointing=True)


def test_plan_matches_real_run_full_finetune_bf16():
    # Known gap, not closed: under bf16 autocast eight saved scalars are bf16 in the plan and fp32 in
    # the real run (16 bytes of ~1.9 MB); everything else is equal to the byte.
    _check("cpu-bench", "leapalign", saved_slack=16, train_mode="full", mixed_precision="bf16",
           model_gradient_checkpointing=True)


def test_plan_matches_real_run_accumulation():
    _check("test", "leapalign", train_gradient_accumulation_steps=2)


def test_model_folder_without_config_json_is_an_error(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(PlanError, match="transformer/config.json"):
        model_spec(str(tmp_path))


def test_unplannable_architecture_is_an_error(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "HunyuanDiT2DModel"}')
    with pytest.raises(PlanError, match="cannot be planned"):
        model_spec(str(tmp_path))


def test_missing_model_path_plans_flux_dev_and_says_so():
    spec = model_spec("/nonexistent/FLUX.1-dev")
    assert isinstance(spec, ModelSpec) and spec.name == "FLUX.1-dev" and spec.notes


@pytest.mark.parametrize("argv, expected", [
    (["--gpu", "Z9000"], "unknown GPU name"),
    (["--world-size", "0"], "world_size=0"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, expected):
    from leapalign.training.plan import main

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: /tmp/x\nprompts: [a]\nmodel_path: 'tiny:test'\nmodel_height: 16\nmodel_width: 16\n")
    assert main([str(config), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_cli_plans_a_tiny_config(tmp_path, capsys):
    import json

    from leapalign.training.plan import main

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: /tmp/x\nprompts: [a]\nmodel_path: 'tiny:test'\nmodel_dtype: float32\n"
                      "model_height: 16\nmodel_width: 16\nobjective: {num_steps: 4}\nreward_specs: [{name: brightness}]\n")
    out_json = tmp_path / "plan.json"
    assert main([str(config), "--gpu", "h100", "--json", str(out_json)]) == 0
    assert "verdict on H100-SXM: FITS" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["peak_bytes"] > 0 and set(report["roofline_s"]) >= {"H100-SXM", "H200", "A100-80GB", "L40S", "RTX-4090"}

"""``leapalign plan`` for FLUX.2 and SD3 (issue 17 item 4): planned against a real run, folders, built-ins.

As ``tests/test_plan.py`` does for FLUX.1: the plan of the tiny FLUX.2 klein (CFG) and SD3.5 models
(fake tensors, the trainer's own wiring) must save the bytes and count the FLOPs of a real
:class:`LeapAlignTrainer` micro-batch + step on real weights, with the peak within 10 %.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leapalign.training.plan_models import PlanError, model_spec
from leapalign.training.plan_trace import IterationSetup, trace_iteration

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(**overrides):
    from leapalign.training.config import LeapAlignConfig

    base = dict(output_dir="/tmp/leapalign-plan-families-test", prompts=["a red cat", "a blue dog"], device="cpu",
                model_dtype="float32", model_height=SIZE, model_width=SIZE, model_guidance=4.0, objective_name="leapalign",
                objective={"num_steps": 3, "hinge_lambda": None, "use_kernels": False}, reward_specs=[{"name": "brightness"}],
                train_mode="lora", lora_rank=4, train_ema_decay=0.9, model_use_leapkernels=False, train_learning_rate=1e-4)
    base.update(overrides)
    return LeapAlignConfig(**base)


class _Encoder:
    """Random conditioning of the shapes the planner gives the spec (text_len tokens; SD3: CLIP's 77 first)."""

    def __init__(self, model, spec) -> None:
        from leapalign.training.plan_setup import _conditioning

        self.model, self.spec, self.conditioning = model, spec, _conditioning

    def encode(self, prompts):
        cond = self.conditioning(self.model, self.spec, len(prompts), torch.float32)
        gen = torch.Generator().manual_seed(0)
        for value in vars(cond).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=gen))
        return cond


def _real_setup(cfg, spec_name: str) -> IterationSetup:
    from leapalign.adapters import tiny_configs
    from leapalign.adapters.flux2 import Flux2VelocityModel
    from leapalign.adapters.sd3 import SD3VelocityModel
    from leapalign.training.trainer import LeapAlignTrainer

    spec = model_spec(f"tiny:{spec_name}")
    kwargs = dict(height=SIZE, width=SIZE, guidance=cfg.model_guidance, gradient_checkpointing=cfg.model_gradient_checkpointing)
    if spec.family == "flux2":
        model = Flux2VelocityModel(tiny_configs.tiny_flux2_transformer("klein"), vae=tiny_configs.tiny_flux2_vae(), cfg=True,
                                   **kwargs)
    else:
        model = SD3VelocityModel(tiny_configs.tiny_sd3_transformer(), vae=tiny_configs.tiny_sd3_vae(), **kwargs)
    trainer = LeapAlignTrainer(cfg, model, prompt_encoder=_Encoder(model, spec))
    trainer.training_step()
    prompts = trainer.micro_batch_prompts(1, 0)
    return IterationSetup(
        model=trainer._rollout_model, network=trainer.network, objective=trainer.objective, reward=trainer.reward,
        cond=trainer.prompt_encoder.encode(prompts), prompts=prompts, optimizer=trainer.optimizer, params=trainer.params,
        ema=trainer.ema, frozen=[model.vae], max_grad_norm=cfg.train_max_grad_norm,
        grad_accumulation=cfg.train_gradient_accumulation_steps, generator=trainer.micro_batch_generator(1, 0),
    )


def _planned(cfg, spec_name: str):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from leapalign.training.plan_setup import build_setup
    from leapkernels.backend import force_backend

    seed = int(np.random.SeedSequence([cfg.seed, 1, 0, 0]).generate_state(1)[0])
    with FakeTensorMode(allow_non_fake_inputs=True), force_backend("reference"):
        return trace_iteration(build_setup(cfg, model_spec(f"tiny:{spec_name}"), generator_seed=seed))


@pytest.mark.parametrize("spec_name, overrides", [
    ("flux2-klein", {}),
    ("sd3", {}),
    ("sd3", {"model_gradient_checkpointing": True}),
])
def test_plan_matches_real_run(spec_name, overrides):
    cfg = _config(**overrides)
    planned, measured = _planned(cfg, spec_name), trace_iteration(_real_setup(cfg, spec_name), skip_nograd=False)
    assert planned.saved_bytes == measured.saved_bytes, (planned.saved_by_dtype, measured.saved_by_dtype)
    assert planned.total_flops == measured.total_flops, (planned.flops, measured.flops)
    assert planned.calls["grad"] == measured.calls["grad"] == 2
    assert abs(planned.peak_bytes - measured.peak_bytes) <= 0.10 * measured.peak_bytes, (planned, measured)


def _folder(tmp_path, family: str, pipeline: str, transformer: dict, **index):
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": family, **transformer}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index}))
    return tmp_path


def test_model_folders_and_built_ins_of_each_family(tmp_path):
    from leapalign.adapters.tiny_configs import tiny_transformer_config

    klein = model_spec(str(_folder(tmp_path / "k", "Flux2Transformer2DModel", "Flux2KleinPipeline",
                                   tiny_transformer_config("flux2", "klein"), is_distilled=True)), text_len=32)
    assert (klein.family, klein.pipeline, klein.distilled, klein.text_len) == ("flux2", "Flux2KleinPipeline", True, 32)
    sd3 = model_spec(str(_folder(tmp_path / "s", "SD3Transformer2DModel", "StableDiffusion3Pipeline", {})))
    assert sd3.family == "sd3" and sd3.vae is None
    # a config written for the training machine names its model by the hub folder name
    spec = model_spec("/models/stable-diffusion-3.5-medium", text_len=256)
    assert spec.name == "SD3.5-medium" and spec.family == "sd3" and "does not exist here" in spec.notes[0]
    assert model_spec("/models/FLUX.2-klein-base-4B").name == "FLUX.2-klein-base-4B"
    assert model_spec("builtin:flux2-klein-4b").distilled
    with pytest.raises(PlanError, match="unknown built-in model 'sdxl'"):
        model_spec("builtin:sdxl")
    mixed = _folder(tmp_path / "m", "SD3Transformer2DModel", "Flux2KleinPipeline", {})
    with pytest.raises(PlanError, match="model_index.json names a Flux2KleinPipeline .* but transformer/config.json a "
                                        "SD3Transformer2DModel"):
        model_spec(str(mixed))


@pytest.mark.parametrize("name, params", [("flux2-klein-base-4b", 3_875_544_576), ("sd3.5-medium", 2_243_171_520)])
def test_built_in_architectures_build_at_their_published_size(name, params):
    """The built-in transformer configs build (meta device): 3.88 B parameters for FLUX.2-klein 4B (BFL's "4B"),
    2.24 B for SD3.5-medium's MMDiT-X (Stability's "2.5B" counts more than the transformer)."""
    import diffusers

    from leapalign.adapters.families import family_named

    spec = model_spec(f"builtin:{name}")
    with torch.device("meta"):
        net = getattr(diffusers, family_named(spec.family).transformer).from_config(dict(spec.transformer))
    assert sum(p.numel() for p in net.parameters()) == params


def test_cli_plans_a_tiny_family_config_and_refuses_an_unknown_class(tmp_path, capsys):
    from leapalign.training.plan import main

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: /tmp/x\nprompts: [a]\nmodel_path: 'tiny:sd3'\nmodel_dtype: float32\nmodel_guidance: 5\n"
                      "model_height: 16\nmodel_width: 16\nobjective: {num_steps: 3}\nreward_specs: [{name: brightness}]\n")
    assert main([str(config), "--gpu", "h100"]) == 0
    assert "verdict on H100-SXM: FITS" in capsys.readouterr().out
    bad = _folder(tmp_path / "bad", "HunyuanDiT2DModel", "HunyuanDiTPipeline", {})
    config.write_text(f"output_dir: /tmp/x\nprompts: [a]\nmodel_path: '{bad}'\n")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'HunyuanDiT2DModel' cannot be planned" in err and "SD3Transformer2DModel" in err, err

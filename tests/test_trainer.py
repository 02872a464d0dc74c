"""LeapAlignTrainer on a tiny FluxPipeline built in code: LoRA and full fine-tune, exports, faults."""
from __future__ import annotations

import pytest
import torch

from leapalign.sampling import euler_sample
from leapalign.training.trainer import LeapAlignTrainer, NonFiniteLossError
from trainer_fixtures import HEIGHT, PROMPTS, WIDTH, tiny_config, tiny_flux_pipeline


def _eval_brightness(trainer: LeapAlignTrainer, use_ema: bool = False) -> float:
    """Mean brightness of a fixed-seed batch (same noise before and after training)."""
    cond = trainer.prompt_encoder.encode(PROMPTS[:4])
    ctx = trainer.ema.swapped_in() if use_ema else torch.no_grad()
    with ctx:
        images = euler_sample(trainer.model, cond, 4, 4, torch.Generator().manual_seed(123))
    return float(images.mean())


def _transformer_out(transformer, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    from leapalign.flow import latent_image_ids, text_ids

    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, (HEIGHT // 2) * (WIDTH // 2), cfg.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]), img_ids=latent_image_ids(HEIGHT, WIDTH), txt_ids=text_ids(8),
            guidance=torch.tensor([3.5]), return_dict=False,
        )[0]


def test_lora_raises_the_reward_and_the_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    cfg = tiny_config(tmp_path / "run", train_num_steps=6, train_learning_rate=0.3, train_ema_decay=0.5,
                      ckpt_save_final=True, sample_every=6, sample_num_images=2)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline())
    base_params = {n: p.detach().clone() for n, p in trainer.network.named_parameters() if "lora" not in n}
    before = _eval_brightness(trainer)
    result = trainer.train()
    after = _eval_brightness(trainer)
    assert result.step == 6 and result.skipped_steps == 0
    assert after > before + 0.01, (before, after)
    # only LoRA weights moved; the base model is untouched
    for n, p in trainer.network.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_params[n]), n
    assert trainer.model.vae.decoder.gradient_checkpointing  # the reward path's VAE decode recomputes
    assert not any(p.requires_grad for p in trainer.model.vae.parameters())
    assert (tmp_path / "run" / "samples" / "step-00000006.png").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 6

    # the diffusers-format LoRA (EMA weights) loads with load_lora_weights and reproduces the EMA model
    fresh = tiny_flux_pipeline()
    plain = _transformer_out(fresh.transformer)
    fresh.load_lora_weights(str(result.checkpoint / "lora"))
    loaded = _transformer_out(fresh.transformer)
    with trainer.ema.swapped_in():
        expected = _transformer_out(trainer.network)
    assert (loaded - plain).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)


def test_full_finetune_trains_every_weight_and_exports_a_loadable_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    cfg = tiny_config(tmp_path / "run", train_mode="full", train_num_steps=2, ckpt_save_final=True)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline())
    start = [p.detach().clone() for p in trainer.params]
    assert len(trainer.params) == len(list(trainer.network.parameters()))
    # text encoders ran once per distinct prompt, then left; the cache matches encode_prompt exactly
    assert trainer.pipeline.text_encoder is None and trainer.pipeline.text_encoder_2 is None
    assert len(trainer.prompt_encoder) == len(PROMPTS)
    embeds, pooled, _ = tiny_flux_pipeline().encode_prompt(["a blue dog", "a red cat"], prompt_2=None, max_sequence_length=8)
    cond = trainer.prompt_encoder.encode(["a blue dog", "a red cat"])
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=1e-5, atol=1e-6)  # batch composition differs
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="never encoded"):
        trainer.prompt_encoder.encode(["a prompt nobody gave"])
    result = trainer.train()
    moved = sum(not torch.equal(a, p) for a, p in zip(start, trainer.params))
    assert moved > 0.8 * len(start)
    exported = FluxTransformer2DModel.from_pretrained(str(result.checkpoint / "transformer"))
    ema = load_file(str(result.checkpoint / "ema.safetensors"))
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.detach(), ema[name], rtol=0, atol=0)


class _FlakyReward:
    """Brightness, but NaN on the calls listed in ``nan_calls``."""

    def __init__(self, nan_calls):
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def __call__(self, images, prompts):
        r = images.float().mean(dim=(1, 2, 3))
        self.calls += 1
        if self.calls in self.nan_calls or "all" in self.nan_calls:
            r = r * float("nan")
        return r


def test_nan_reward_skips_the_step_without_touching_weights_or_optimizer(tmp_path):
    cfg = tiny_config(tmp_path / "run", train_num_steps=1)
    reward = _FlakyReward({2})
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline(), reward=reward)
    trainer.training_step()  # a good step: optimiser state exists
    weights = [p.detach().clone() for p in trainer.params]
    ema = [s.clone() for s in trainer.ema.shadow]
    opt = {k: {sk: sv.clone() for sk, sv in st.items()} for k, st in trainer.optimizer.state.items()}
    lr_step = trainer.lr_scheduler.last_epoch
    metrics = trainer.training_step()  # reward call 2 is NaN
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_total == 1 and trainer.step == 2
    assert all(torch.equal(a, p) for a, p in zip(weights, trainer.params))
    assert all(torch.equal(a, s) for a, s in zip(ema, trainer.ema.shadow))
    for k, st in trainer.optimizer.state.items():
        assert all(torch.equal(opt[k][sk], sv) for sk, sv in st.items())
    assert trainer.lr_scheduler.last_epoch == lr_step
    assert all(p.grad is None for p in trainer.params)
    trainer.training_step()  # finite again: the in-a-row counter resets, weights move
    assert trainer.nonfinite_in_row == 0
    assert any(not torch.equal(a, p) for a, p in zip(weights, trainer.params))


def test_nan_every_step_stops_with_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "run", train_num_steps=10, train_max_nonfinite_steps=2)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline(), reward=_FlakyReward({"all"}))
    with pytest.raises(NonFiniteLossError, match="2 optimiser steps in a row"):
        trainer.train()
    assert trainer.step == 2


def test_works_with_a_non_flux_velocity_model_and_prompt_encoder(tmp_path):
    """Any VelocityModel: H1's tiny adapter without a pipeline, conditioning from a user encoder."""
    from leapalign.models.tiny_flux import random_flux_conditioning, tiny_flux_velocity_model

    model = tiny_flux_velocity_model("test", with_vae=False)

    class Encoder:
        def encode(self, prompts):
            g = torch.Generator().manual_seed(sum(map(len, prompts)))
            return random_flux_conditioning(model.transformer, len(prompts), generator=g)

    cfg = tiny_config(tmp_path / "run", train_num_steps=2, train_gradient_accumulation_steps=2, model_height=16,
                      model_width=16, lora_target_modules=["attn.to_q", "attn.to_v"])
    trainer = LeapAlignTrainer(cfg, model, prompt_encoder=Encoder())
    assert all("lora" in n and ("to_q" in n or "to_v" in n) for n in trainer.param_names)
    result = trainer.train()
    assert result.step == 2 and result.last_metrics["grad_norm"] > 0


def test_leapkernels_patched_model_gives_the_same_gradients(tmp_path):
    """model_use_leapkernels swaps the fused Flux ops in (LoRA still applies): same step-0 gradients."""
    grads = []
    for use in (False, True):
        cfg = tiny_config(tmp_path / str(use), model_use_leapkernels=use, train_batch_size=1)
        trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline())
        assert ("forward" in trainer.network.transformer_blocks[0].__dict__) == use  # patched per instance
        finite, _ = trainer.compute_gradients(0)
        assert finite
        grads.append([p.grad.clone() for p in trainer.params])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_leapkernels_default_is_auto_on_for_flux(tmp_path):
    """model_use_leapkernels=None (default) patches a diffusers Flux transformer; false leaves it alone."""
    from leapkernels import is_patched

    assert is_patched(LeapAlignTrainer(tiny_config(tmp_path / "auto"), tiny_flux_pipeline()).network)
    off = tiny_config(tmp_path / "off", model_use_leapkernels=False)
    assert not is_patched(LeapAlignTrainer(off, tiny_flux_pipeline()).network)


def test_bf16_autocast_trainer_after_an_fp32_one_in_the_same_process(tmp_path):
    """mixed_precision=bf16 runs the rollout under autocast; trainable weights and EMA stay fp32."""
    LeapAlignTrainer(tiny_config(tmp_path / "fp32", train_num_steps=1), tiny_flux_pipeline())
    trainer = LeapAlignTrainer(tiny_config(tmp_path / "bf16", mixed_precision="bf16", train_num_steps=1), tiny_flux_pipeline())
    assert trainer.accelerator.mixed_precision == "bf16"
    start = [p.detach().clone() for p in trainer.params]
    metrics = trainer.training_step()
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.params) and trainer.ema.shadow[0].dtype == torch.float32
    assert any(not torch.equal(a, p) for a, p in zip(start, trainer.params))


def _steps(out) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_skipped_step_is_logged_with_the_step_number_the_warning_gives(tmp_path, caplog):
    """log_every does not hide a skipped step; the last one before the stop is logged too; warnings,
    the error and metrics.jsonl all say "step N" for the N-th optimiser step."""
    cfg = tiny_config(tmp_path / "run", train_num_steps=10, train_max_nonfinite_steps=2, log_every=5, model_use_leapkernels=False)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline(), reward=_FlakyReward({"all"}))
    with caplog.at_level("WARNING", logger="leapalign.trainer"), pytest.raises(NonFiniteLossError, match="stopping at step 2"):
        trainer.train()
    logged = _steps(tmp_path / "run")
    assert [(m["step"], m["skipped"]) for m in logged] == [(1.0, 1.0), (2.0, 1.0)]
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["step 1", "step 2"]


def test_a_reward_without_a_gradient_is_named_at_the_first_step(tmp_path):
    from leapalign.training.errors import RewardGradientError
    from trainer_fixtures import detached_reward

    cfg = tiny_config(tmp_path / "run", model_use_leapkernels=False)
    trainer = LeapAlignTrainer(cfg, tiny_flux_pipeline(), reward=detached_reward)
    with pytest.raises(RewardGradientError, match=r"^step 1: the reward \(detached_reward\): .*without a gradient path to the images"):
        trainer.training_step()


def test_sample_every_also_writes_the_final_grid(tmp_path):
    cfg = tiny_config(tmp_path / "run", train_num_steps=3, sample_every=2, sample_num_images=1, sample_num_steps=2,
                      model_use_leapkernels=False)
    LeapAlignTrainer(cfg, tiny_flux_pipeline()).train()
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000002.png", "step-00000003.png"]


def test_resume_logs_each_step_once_and_latest_without_a_checkpoint_says_so(tmp_path, caplog):
    common = dict(ckpt_every=2, ckpt_save_final=False, model_use_leapkernels=False)
    with caplog.at_level("WARNING", logger="leapalign.trainer"):
        first = LeapAlignTrainer(tiny_config(tmp_path / "run", train_num_steps=3, ckpt_resume_from="latest", **common), tiny_flux_pipeline())
        first.train()  # a checkpoint at step 2; step 3 logged but never saved (as if killed after it)
    assert any("no checkpoint in" in r.getMessage() and "starting fresh at step 0" in r.getMessage() for r in caplog.records)
    assert [m["step"] for m in _steps(tmp_path / "run")] == [1, 2, 3]
    resumed = LeapAlignTrainer(tiny_config(tmp_path / "run", train_num_steps=4, ckpt_resume_from="latest", **common), tiny_flux_pipeline())
    resumed.train()
    assert [m["step"] for m in _steps(tmp_path / "run")] == [1, 2, 3, 4]


def test_rollout_compile_auto_is_on_where_it_pays_only_and_off_is_off(tmp_path):
    from leapalign.rollout_engine import CompiledRollout

    # on CPU a compile pays back after ~600 cpu-bench iterations: 300 steps x 2 micro-batches do not reach 1000
    short = LeapAlignTrainer(tiny_config(tmp_path / "short", train_num_steps=300, train_gradient_accumulation_steps=2),
                             tiny_flux_pipeline())
    assert short.rollout is short.model
    long = LeapAlignTrainer(tiny_config(tmp_path / "long", train_num_steps=500, train_gradient_accumulation_steps=2),
                            tiny_flux_pipeline())
    assert isinstance(long.rollout, CompiledRollout) and long.rollout.wrapped is long.model
    assert tiny_config(tmp_path / "gpu").rollout_engine(long.model, "none", "cuda").compile == "off"  # 4 steps
    assert tiny_config(tmp_path / "gpu", train_num_steps=100).rollout_engine(long.model, "none", "cuda").compile == "default"
    assert tiny_config(tmp_path / "gpu", train_num_steps=100).rollout_engine(long.model, "fsdp", "cuda").compile == "off"
    off = LeapAlignTrainer(tiny_config(tmp_path / "off", train_num_steps=1000, rollout_compile="off"), tiny_flux_pipeline())
    assert off.rollout is off.model
    from leapalign.training.config import ConfigError

    with pytest.raises(ConfigError, match="rollout_compile='fast' is invalid"):
        tiny_config(tmp_path / "bad", rollout_compile="fast")


@pytest.mark.slow
def test_compiled_rollout_run_resumes_bit_identically(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, checkpoint, a new trainer resumes for 2 more; the rollout compiled
    (dynamo + AOTAutograd, no inductor codegen: the wiring, not inductor's numerics, is under test;
    the patched ops on their PyTorch references, not the Triton interpreter)."""
    import leapalign.rollout_engine as engine_module
    import leapkernels

    monkeypatch.setattr(leapkernels.backend, "_forced", "reference")

    real_compile = torch.compile
    monkeypatch.setattr(engine_module.torch, "compile",
                        lambda m, dynamic=False, mode=None: real_compile(m, backend="aot_eager", dynamic=dynamic))
    common = dict(rollout_compile="default", ckpt_save_final=True, train_lr_warmup_steps=3)
    straight = LeapAlignTrainer(tiny_config(tmp_path / "a", **common), tiny_flux_pipeline())
    straight.train()
    assert straight.rollout.compiled_calls > 0
    LeapAlignTrainer(tiny_config(tmp_path / "b", train_num_steps=2, **common), tiny_flux_pipeline()).train()
    resumed = LeapAlignTrainer(tiny_config(tmp_path / "b", ckpt_resume_from="latest", **common), tiny_flux_pipeline())
    resumed.train()
    for name, p, q in zip(straight.param_names, straight.params, resumed.params):
        assert torch.equal(p, q), name
    assert straight.last_metrics["loss"] == resumed.last_metrics["loss"]

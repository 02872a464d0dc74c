"""The FLUX.2 adapter against diffusers' Flux2Pipeline / Flux2KleinPipeline on tiny models built in code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.adapters import pipeline_family, velocity_model_from_pipeline
from leapalign.adapters.base import VelocityModel
from leapalign.adapters.flux2 import Flux2Conditioning, Flux2VelocityModel, flux2_empirical_mu
from leapalign.adapters.schedules import FlowMatchSchedule
from leapalign.adapters.tiny_configs import (
    FLUX2_TEXT_LAYERS,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
    tiny_flux2_vae,
)
from leapalign.flow import rollout

H = W = 8  # pixels; the tiny VAE does not down-sample: 8x8 latents, 2x2-patchified to 16 tokens of 4 channels
T = 4
PROMPTS = ["a red cube", "two blue spheres"]
MAX_LEN = 24


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for variant in ("dev", "klein", "klein-distilled"):
        pipe = tiny_flux2_pipeline(variant)
        pipe.set_progress_bar_config(disable=True)
        out[variant] = pipe
    return out


def adapter(pipe, **kw):
    kw.setdefault("text_encoder_out_layers", FLUX2_TEXT_LAYERS)
    return Flux2VelocityModel.from_pipeline(pipe, height=H, width=W, guidance=4.0, max_sequence_length=MAX_LEN, **kw)


def dev_cond(batch: int = 2, seed: int = 1) -> Flux2Conditioning:
    return Flux2Conditioning(torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(seed)))


def test_adapter_satisfies_protocol(pipes):
    model = adapter(pipes["dev"])
    assert isinstance(model, VelocityModel)
    assert model.seq_len == 16 and model.channels == 4 and model.latent_height == 8
    assert len(model.trainable_parameters()) == len(list(model.transformer.parameters()))
    assert not model.do_cfg and adapter(pipes["klein"]).do_cfg and not adapter(pipes["klein-distilled"]).do_cfg
    assert pipeline_family(pipes["klein"]) == "flux2"


def test_noise_and_ids_equal_pipeline_prepare_latents(pipes):
    pipe = pipes["dev"]
    model = adapter(pipe)
    theirs, ids = pipe.prepare_latents(2, 1, H, W, torch.float32, "cpu", torch.Generator().manual_seed(0))
    ours = model.noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs) and ours.stride() == theirs.stride()
    assert torch.equal(model._image_ids(ours.device), ids[0])
    assert torch.equal(model._text_ids(7, ours.device), pipe._prepare_text_ids(torch.zeros(1, 7, 32))[0])


@pytest.mark.parametrize("config", [dict(shift=3.0, use_dynamic_shifting=True), dict(shift=3.0), dict()])
def test_sigmas_are_the_schedulers_float32_values(config):
    """linspace(1, 1/T, T) through set_timesteps(sigmas=..., mu=empirical mu): equal bit for bit."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    model = Flux2VelocityModel(tiny_flux2_transformer("dev"), height=H, width=W,
                               schedule=FlowMatchSchedule.from_scheduler(scheduler))
    for num_steps in (1, 4, 25, 50):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                mu=flux2_empirical_mu(model.seq_len, num_steps))
        ours = model.sigmas(num_steps)
        assert ours.dtype == torch.float64 and torch.equal(ours, ours.float().double())
        assert torch.equal(ours.float(), scheduler.sigmas), num_steps


@pytest.mark.parametrize("variant", ["dev", "klein-distilled", "klein"])
def test_rollout_equals_pipeline_sampling(pipes, variant):
    """Same noise, same text: the adapter's Euler rollout + decode is the pipeline's image.

    dev (embedded guidance) and klein-distilled (no CFG): bit for bit, each from the pipeline's own
    text path. klein base (CFG): the pipeline runs uncond and cond as two forwards of batch B, the
    adapter as ONE forward of batch 2B (the issue's contract: one graph for the guided velocity),
    and CPU GEMMs round differently for different batch sizes, so they agree to float32 rounding
    (measured 4e-7 on the [0, 1] image), not bit for bit.
    """
    pipe = pipes[variant]
    model = adapter(pipe)
    x = model.noise(2, torch.Generator().manual_seed(3))
    latents = x.permute(0, 2, 1).reshape(2, model.channels, model.latent_height // 2, model.latent_width // 2)
    cond = model.encode_prompts(PROMPTS)
    text = dict(prompt=PROMPTS, max_sequence_length=MAX_LEN, text_encoder_out_layers=FLUX2_TEXT_LAYERS)
    theirs = pipe(latents=latents, num_inference_steps=T, guidance_scale=4.0, height=H, width=W, output_type="pt",
                  **text).images
    with torch.no_grad():
        ours = model.decode(rollout(model, cond, x, model.sigmas(T)).x0)
    assert ours.shape == (2, 3, H, W)
    if variant == "klein":
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), f"max |diff| = {(ours - theirs).abs().max().item()}"
    else:
        assert torch.equal(ours, theirs), f"max |diff| = {(ours - theirs).abs().max().item()}"


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_encode_prompts_is_the_pipelines_text_path(variant):
    """dev: Mistral-3 layers; klein: Qwen3 layers and the empty negative prompt, cached once."""
    pipe = tiny_flux2_pipeline(variant)  # its own copy: this test releases the text encoder
    model = adapter(pipe)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_LEN, text_encoder_out_layers=FLUX2_TEXT_LAYERS)
        negative, _ = pipe.encode_prompt([""], max_sequence_length=MAX_LEN, text_encoder_out_layers=FLUX2_TEXT_LAYERS)
    assert torch.equal(cond.prompt_embeds, embeds)
    if variant == "dev":
        assert cond.negative_prompt_embeds is None
    else:
        assert torch.equal(cond.negative_prompt_embeds, negative.expand_as(embeds))
    assert torch.equal(model._text_ids(embeds.shape[1], embeds.device), text_ids[0])
    model.release_text_encoders()
    assert pipe.text_encoder is None and pipe.tokenizer is None
    again = model.encode_prompts(PROMPTS[::-1])  # cached rows still served, in any order
    assert torch.equal(again.prompt_embeds, embeds.flip(0))
    with pytest.raises(RuntimeError, match="never encoded and the text encoders were released"):
        model.encode_prompts(["a new prompt"])


def test_embedded_guidance_and_sigma_reach_the_model(pipes):
    model = adapter(pipes["dev"])
    cond = dev_cond()
    x = model.noise(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model.velocity(x, 0.5, cond)
        per_sample = model.velocity(x, torch.tensor([0.5, 0.5], dtype=torch.float64), cond)
        model.guidance = 1.5
        other_guidance = model.velocity(x, 0.5, cond)
        model.guidance = 4.0
        other_sigma = model.velocity(x, 0.4, cond)
    assert torch.equal(base, per_sample)
    assert not torch.allclose(base, other_guidance) and not torch.allclose(base, other_sigma)


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_text_encoder_layout_is_refused(pipes):
    """The pipelines' default layers do not exist in a 2-layer encoder; 1 layer x 16 != 32 dims."""
    with pytest.raises(ValueError, match=r"Flux2Pipeline text encoder Mistral3ForConditionalGeneration has 2 hidden "
                                         r"layers but text_encoder_out_layers=\(10, 20, 30\)"):
        Flux2VelocityModel.from_pipeline(pipes["dev"], height=H, width=W)
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM has 2 hidden layers but text_encoder_out_layers=\(9, 18, 27\)"):
        Flux2VelocityModel.from_pipeline(pipes["klein"], height=H, width=W)
    with pytest.raises(ValueError, match=r"stacking text_encoder_out_layers=\(2,\) gives 16-dim prompt embeddings, "
                                         r"but the transformer's joint_attention_dim is 32; supported: joint_attention_dim"):
        Flux2VelocityModel.from_pipeline(pipes["klein"], height=H, width=W, text_encoder_out_layers=(2,))


def test_unservable_configs_are_refused(pipes):
    with pytest.raises(ValueError, match="patch_size=2 is not supported"):
        Flux2VelocityModel(tiny_flux2_transformer("dev", patch_size=2), height=H, width=W)
    with pytest.raises(ValueError, match="transformer must be a Flux2Transformer2DModel, got Linear"):
        Flux2VelocityModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not fit a transformer with in_channels=8"):
        Flux2VelocityModel(tiny_flux2_transformer("dev", in_channels=8), vae=tiny_flux2_vae(), height=H, width=W)
    with pytest.raises(ValueError, match="height must be a positive multiple of 2"):
        Flux2VelocityModel(tiny_flux2_transformer("dev"), height=7, width=W)
    karras = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        Flux2VelocityModel.from_pipeline(tiny_flux2_pipeline("dev", with_text_encoder=False, scheduler=karras))


def test_unsupported_pipeline_family_is_named(pipes):
    class StableDiffusionXLPipeline:  # stands in for any pipeline we do not serve
        pass

    with pytest.raises(ValueError, match=r"unsupported pipeline family: got StableDiffusionXLPipeline .*supported: "
                                         r"FluxPipeline \(FLUX.1\), Flux2Pipeline .*StableDiffusion3Pipeline"):
        velocity_model_from_pipeline(StableDiffusionXLPipeline())
    with pytest.raises(ValueError, match="is not a FLUX.2 pipeline"):
        Flux2VelocityModel.from_pipeline(StableDiffusionXLPipeline())
    model = velocity_model_from_pipeline(pipes["dev"], height=H, width=W, text_encoder_out_layers=FLUX2_TEXT_LAYERS)
    assert isinstance(model, Flux2VelocityModel)


def test_conditioning_and_velocity_reject_bad_input(pipes):
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have prompt_embeds' shape \(2, 7, 32\)"):
        Flux2Conditioning(torch.zeros(2, 7, 32), torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match=r"text_ids must have shape \(7, 4\)"):
        Flux2Conditioning(torch.zeros(2, 7, 32), text_ids=torch.zeros(7, 3))
    model = adapter(pipes["klein"])
    x = model.noise(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="classifier-free guidance .* needs cond.negative_prompt_embeds"):
        model.velocity(x, 0.5, dev_cond())
    with pytest.raises(ValueError, match="cond has batch size 3 but x has batch size 2"):
        model.velocity(x, 0.5, dev_cond(3))
    with pytest.raises(ValueError, match=r"x must be packed latents \[B, 16, 4\]"):
        model.velocity(torch.zeros(2, 15, 4), 0.5, dev_cond())
    with pytest.raises(TypeError, match="cond must be a Flux2Conditioning"):
        model.velocity(x, 0.5, {"prompt_embeds": torch.zeros(2, 7, 32)})
    bare = Flux2VelocityModel.from_pipeline(tiny_flux2_pipeline("dev", with_text_encoder=False), height=H, width=W)
    with pytest.raises(ValueError, match="no text path"):
        bare.encode_prompts(PROMPTS)

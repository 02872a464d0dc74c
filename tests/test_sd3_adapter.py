"""The SD3 adapter against diffusers' StableDiffusion3Pipeline on tiny models built in code."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as diffusers_shift

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.adapters import pipeline_family, velocity_model_from_pipeline
from leapalign.adapters.base import VelocityModel
from leapalign.adapters.schedules import FlowMatchSchedule, calculate_shift
from leapalign.adapters.sd3 import SD3Conditioning, SD3VelocityModel
from leapalign.adapters.tiny_configs import tiny_sd3_pipeline, tiny_sd3_transformer, tiny_sd3_vae
from leapalign.flow import pack_latents, rollout

H = W = 8  # pixels; the tiny VAE does not down-sample: 8x8 latents, 2x2 patches -> 16 tokens of 16 channels
T = 4
PROMPTS = ["a red cube", "blue"]
MAX_LEN = 10


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter(pipe, guidance: float = 5.0, **kw) -> SD3VelocityModel:
    return SD3VelocityModel.from_pipeline(pipe, height=H, width=W, guidance=guidance, max_sequence_length=MAX_LEN, **kw)


def random_cond(batch: int = 2, seed: int = 1, negative: bool = True) -> SD3Conditioning:
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(batch, 9, 32, generator=gen), torch.randn(batch, 32, generator=gen)]
    if negative:
        parts += [torch.randn(batch, 9, 32, generator=gen), torch.randn(batch, 32, generator=gen)]
    return SD3Conditioning(*parts)


def test_adapter_satisfies_protocol(pipe):
    model = adapter(pipe)
    assert isinstance(model, VelocityModel)
    assert (model.seq_len, model.channels, model.latent_height) == (16, 16, 8)
    assert model.do_cfg and not adapter(pipe, guidance=1.0).do_cfg
    assert pipeline_family(pipe) == "sd3" and isinstance(velocity_model_from_pipeline(pipe, height=H, width=W), SD3VelocityModel)


def test_noise_equals_pipeline_prepare_latents_as_patch_tokens(pipe):
    model = adapter(pipe)
    theirs = pipe.prepare_latents(2, 4, H, W, torch.float32, "cpu", torch.Generator().manual_seed(0))
    ours = model.noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(model.unpack(ours), theirs)
    assert torch.equal(ours, pack_latents(theirs))  # patch 2: Flux's 2x2 packing


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(), dict(use_dynamic_shifting=True, max_shift=1.16)])
def test_sigmas_are_the_schedulers_own_spacing(config):
    """No custom sigmas (what the pipeline passes): linspace(sigma_max, sigma_min) shifted, bit for bit."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    model = SD3VelocityModel(tiny_sd3_transformer(), height=H, width=W, schedule=FlowMatchSchedule.from_scheduler(scheduler))
    mu = diffusers_shift(model.seq_len, 256, 4096, 0.5, config.get("max_shift", 1.15))
    assert calculate_shift(model.seq_len, max_shift=config.get("max_shift", 1.15)) == mu
    for num_steps in (1, 4, 28, 50):
        scheduler.set_timesteps(num_steps, mu=mu if scheduler.config.use_dynamic_shifting else None)
        assert torch.equal(model.sigmas(num_steps).float(), scheduler.sigmas), num_steps


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_rollout_equals_pipeline_sampling_bit_for_bit(pipe, guidance):
    """Same noise and embeddings: the adapter's rollout is the pipeline's latents and image, bit for bit.

    guidance 5: the pipeline's batched [uncond; cond] forward and v_u + g (v_c - v_u); guidance 1: no CFG.
    """
    model = adapter(pipe, guidance=guidance)
    x = model.noise(2, torch.Generator().manual_seed(3))
    cond = model.encode_prompts(PROMPTS)
    embeds = dict(
        prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=cond.negative_prompt_embeds.contiguous(),
        negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds.contiguous(),
    )
    call = dict(latents=model.unpack(x), num_inference_steps=T, guidance_scale=guidance, height=H, width=W, **embeds)
    theirs_latents = pipe(output_type="latent", **call).images
    theirs_images = pipe(output_type="pt", **call).images
    with torch.no_grad():
        x0 = rollout(model, cond, x, model.sigmas(T)).x0
        images = model.decode(x0)
    assert torch.equal(model.unpack(x0), theirs_latents), f"max |diff| = {(model.unpack(x0) - theirs_latents).abs().max()}"
    assert images.shape == (2, 3, H, W) and torch.equal(images, theirs_images)


def test_encode_prompts_is_the_pipelines_text_path():
    """Rows equal pipe.encode_prompt's (CLIP-L + CLIP-G + T5); the negative is encode_prompt("")."""
    pipe = tiny_sd3_pipeline()  # its own copy: this test releases the text encoders
    model = adapter(pipe)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_LEN)
        neg, _, neg_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=MAX_LEN)
        _, neg_batched, _, neg_pooled_batched = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=MAX_LEN)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled)
    assert torch.equal(cond.negative_prompt_embeds, neg.expand_as(embeds))
    assert torch.equal(cond.negative_pooled_prompt_embeds, neg_pooled.expand_as(pooled))
    # the pipeline encodes B copies of "" in one batch: the same rows up to GEMM rounding
    assert torch.allclose(cond.negative_pooled_prompt_embeds, neg_pooled_batched, rtol=0, atol=1e-6)
    assert torch.allclose(cond.negative_prompt_embeds, neg_batched, rtol=0, atol=1e-6)
    model.release_text_encoders()
    assert all(getattr(pipe, n) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"))
    assert torch.equal(model.encode_prompts(PROMPTS[:1]).prompt_embeds, embeds[:1])
    with pytest.raises(RuntimeError, match="never encoded and the text encoders were released"):
        model.encode_prompts(["a new prompt"])


# -- bad input -------------------------------------------------------------------------------------


def test_unservable_configs_are_refused(pipe):
    with pytest.raises(ValueError, match=r"a 32x32 image is 16 patches across, more than the transformer's "
                                         r"pos_embed_max_size=8; the largest it can serve is 16 pixels"):
        SD3VelocityModel(tiny_sd3_transformer(pos_embed_max_size=8), height=32, width=32)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 2 \(vae scale factor x patch size\)"):
        SD3VelocityModel(tiny_sd3_transformer(), height=7, width=8)
    with pytest.raises(ValueError, match="vae.latent_channels=4 does not match transformer in_channels=8"):
        SD3VelocityModel(tiny_sd3_transformer(in_channels=8, out_channels=8), vae=tiny_sd3_vae(), height=H, width=W)
    with pytest.raises(ValueError, match="transformer must be an SD3Transformer2DModel, got Linear"):
        SD3VelocityModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not an SD3 pipeline"):
        SD3VelocityModel.from_pipeline(object())
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    with pytest.raises(ValueError, match="shift_terminal=0.1 is not supported"):
        SD3VelocityModel.from_pipeline(tiny_sd3_pipeline(with_text_encoders=False, scheduler=shifted), height=H, width=W)


def test_conditioning_and_velocity_reject_bad_input(pipe):
    with pytest.raises(ValueError, match="prompt_embeds has batch 2 but pooled_prompt_embeds has batch 3"):
        SD3Conditioning(torch.zeros(2, 9, 32), torch.zeros(3, 32))
    with pytest.raises(ValueError, match="must be given together"):
        SD3Conditioning(torch.zeros(2, 9, 32), torch.zeros(2, 32), torch.zeros(2, 9, 32))
    with pytest.raises(ValueError, match="classifier-free guidance runs both in one batched forward"):
        SD3Conditioning(torch.zeros(2, 9, 32), torch.zeros(2, 32), torch.zeros(2, 8, 32), torch.zeros(2, 32))
    model = adapter(pipe)
    x = model.noise(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs the negative embeddings in cond"):
        model.velocity(x, 0.5, random_cond(negative=False))
    with pytest.raises(ValueError, match="cond has batch size 3 but x has batch size 2"):
        model.velocity(x, 0.5, random_cond(3))
    with pytest.raises(ValueError, match=r"x must be patch tokens \[B, 16, 16\]"):
        model.velocity(torch.zeros(2, 16, 4), 0.5, random_cond())
    with pytest.raises(TypeError, match="cond must be an SD3Conditioning"):
        model.velocity(x, 0.5, random_cond().prompt_embeds)
    bare = SD3VelocityModel.from_pipeline(tiny_sd3_pipeline(with_text_encoders=False), height=H, width=W)
    with pytest.raises(ValueError, match="no text path"):
        bare.encode_prompts(PROMPTS)
    assert random_cond().select([1]).batch_size == 1


def test_adapter_prompt_encoder_serves_the_trainer_interface():
    """encode / precompute / release_text_encoders / released, as FluxPromptEncoder offers them."""
    from leapalign.adapters.prompt_cache import AdapterPromptEncoder

    model = adapter(tiny_sd3_pipeline())
    encoder = AdapterPromptEncoder(model)
    encoder.precompute(PROMPTS + PROMPTS[:1])
    assert len(encoder) == 3 and not encoder.released  # the negative "" and two prompts
    encoder.release_text_encoders()
    assert encoder.released and torch.equal(encoder.encode(PROMPTS).prompt_embeds, model.encode_prompts(PROMPTS).prompt_embeds)
    with pytest.raises(ValueError, match="has no text path"):
        AdapterPromptEncoder(SD3VelocityModel(tiny_sd3_transformer(), height=H, width=W))

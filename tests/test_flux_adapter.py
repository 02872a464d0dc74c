"""The Flux adapter against diffusers' FluxPipeline on the tiny models built in code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.adapters.base import VelocityModel
from leapalign.adapters.flux import FluxConditioning, FluxVelocityModel
from leapalign.flow import latent_image_ids, pack_latents
from leapalign.models.tiny_flux import (
    random_flux_conditioning,
    tiny_flux_spec,
    tiny_flux_transformer,
    tiny_flux_vae,
    tiny_flux_velocity_model,
)
from leapalign.profiling import SavedTensorCounter

H = W = 16  # pixels; the "test" VAE does not down-sample, so 16x16 latents, 64 packed tokens


@pytest.fixture(scope="module")
def pipe():
    transformer = tiny_flux_transformer("test")
    vae = tiny_flux_vae("test")
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )


@pytest.fixture(scope="module")
def model(pipe):
    return FluxVelocityModel.from_pipeline(pipe, height=H, width=W)


@pytest.fixture(scope="module")
def cond(pipe):
    return random_flux_conditioning(pipe.transformer, 2, 8, generator=torch.Generator().manual_seed(5))


def test_adapter_satisfies_protocol(model):
    assert isinstance(model, VelocityModel)
    assert model.seq_len == 64 and model.latent_height == 16
    assert len(model.trainable_parameters()) == len(list(model.transformer.parameters()))


def test_noise_equals_pipeline_prepare_latents(pipe, model):
    theirs, ids = pipe.prepare_latents(2, 1, H, W, torch.float32, "cpu", torch.Generator().manual_seed(0))
    ours = model.noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs)
    assert torch.equal(model.image_ids(ours), ids)


def test_velocity_equals_pipeline_transformer_call(pipe, model, cond):
    """timestep = sigma (FluxPipeline passes t / 1000), guidance per sample, 2-D ids, pooled projections."""
    x = model.noise(2, torch.Generator().manual_seed(1))
    sigma = 0.6129
    t = torch.tensor(sigma * 1000, dtype=torch.float32)
    with torch.no_grad():
        theirs = pipe.transformer(
            hidden_states=x,
            timestep=t.expand(2).to(x.dtype) / 1000,
            guidance=torch.full([1], 3.5, dtype=torch.float32).expand(2),
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(8, 3),
            img_ids=pipe._prepare_latent_image_ids(2, H // 2, W // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]
        ours = model.velocity(x, torch.tensor(sigma, dtype=torch.float64), cond)
        per_sample = model.velocity(x, torch.tensor([sigma, sigma], dtype=torch.float64), cond)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours, per_sample)


def test_guidance_and_sigma_reach_the_model(cond):
    model = tiny_flux_velocity_model("test", with_vae=False)
    x = model.noise(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model.velocity(x, 0.5, cond)
        model.guidance = 1.0
        other_guidance = model.velocity(x, 0.5, cond)
        model.guidance = 3.5
        other_sigma = model.velocity(x, 0.4, cond)
    assert not torch.allclose(base, other_guidance) and not torch.allclose(base, other_sigma)
    # a guidance-free (schnell-like) transformer gets no guidance tensor and still runs
    schnell = FluxVelocityModel(tiny_flux_transformer("test", guidance_embeds=False), height=8, width=8)
    with torch.no_grad():
        out = schnell.velocity(schnell.noise(2, torch.Generator().manual_seed(0)), 0.5, cond)
    assert out.shape == (2, 16, 4) and torch.isfinite(out).all()


def test_sigmas_equal_pipeline_schedule(pipe, model):
    num_steps = 7
    pipe.scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(model.seq_len), device="cpu"
    )
    assert torch.allclose(model.sigmas(num_steps).float(), pipe.scheduler.sigmas, rtol=0, atol=2e-7)


def test_from_pipeline_static_shift_matches_scheduler(pipe):
    """A scheduler without dynamic shifting (shift=3, SD3-style) gives its static-shift sigmas."""
    static = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    num_steps = 6
    static.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu")
    wrapped = FluxVelocityModel.from_pipeline(
        FluxPipeline(static, pipe.vae, None, None, None, None, pipe.transformer), height=H, width=W
    )
    assert torch.allclose(wrapped.sigmas(num_steps).float(), static.sigmas, rtol=0, atol=2e-7)


def test_decode_equals_pipeline_postprocess(pipe, model):
    """unpack -> / scaling + shift -> vae.decode -> (x / 2 + 0.5).clamp(0, 1), bit for bit."""
    latents = model.noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = pipe._unpack_latents(latents, H, W, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        theirs = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
        ours = model.decode(latents)
    assert ours.shape == (2, 3, H, W)
    assert torch.equal(ours, theirs)


def test_decode_without_vae_unpacks_latents_as_pixels():
    model = tiny_flux_velocity_model("test", with_vae=False)
    latents = model.noise(1, torch.Generator().manual_seed(0))
    images = model.decode(latents)
    assert images.shape == (1, 1, 8, 8)
    assert torch.equal(pack_latents(images), latents)


def test_decode_is_differentiable(model):
    latents = model.noise(2, torch.Generator().manual_seed(4)).requires_grad_(True)
    images = model.decode(latents)
    (g,) = torch.autograd.grad(images.sum(), latents)
    assert g.abs().sum() > 0


def test_gradient_checkpointing_same_gradients_fewer_saved_bytes(cond):
    """Per-block checkpointing through diffusers' hook: identical gradients, less saved for backward."""
    results = {}
    for ckpt in (False, True):
        transformer = tiny_flux_transformer("test", dtype=torch.float64)
        model = FluxVelocityModel(transformer, height=8, width=8, gradient_checkpointing=ckpt)
        assert model.transformer.gradient_checkpointing is ckpt
        x = model.noise(2, torch.Generator().manual_seed(0))
        c = cond.to(dtype=torch.float64)
        with SavedTensorCounter() as counter:
            v = model.velocity(x, 0.7, c)
        (v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
        with torch.no_grad():  # no-grad calls are unaffected by the hook
            v_nograd = model.velocity(x, 0.7, c)
        results[ckpt] = (grads, counter.bytes, v.detach(), v_nograd)
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-12, atol=0)
    assert results[True][1] < results[False][1] / 2, (results[True][1], results[False][1])
    assert torch.equal(results[True][2], results[True][3])


def test_conditioning_rejects_bad_shapes():
    with pytest.raises(ValueError, match="prompt_embeds has batch 2 but pooled_prompt_embeds has batch 3"):
        FluxConditioning(torch.zeros(2, 8, 32), torch.zeros(3, 32))
    with pytest.raises(ValueError, match=r"prompt_embeds must be \[B, L, D\]"):
        FluxConditioning(torch.zeros(8, 32), torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must be \[B, P\]"):
        FluxConditioning(torch.zeros(1, 8, 32), torch.zeros(1, 1, 32))
    with pytest.raises(ValueError, match=r"text_ids must have shape \(8, 3\)"):
        FluxConditioning(torch.zeros(1, 8, 32), torch.zeros(1, 32), text_ids=torch.zeros(7, 3))
    cond = FluxConditioning(torch.zeros(3, 8, 32), torch.zeros(3, 32))
    assert cond.select(slice(0, 2)).batch_size == 2


def test_velocity_rejects_mismatched_inputs(model, cond):
    x = model.noise(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cond has batch size 2 but x has batch size 3"):
        model.velocity(x, 0.5, cond)
    with pytest.raises(ValueError, match=r"x must be packed latents \[B, 64, 4\]"):
        model.velocity(torch.zeros(2, 63, 4), 0.5, cond)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or \[2\]"):
        model.velocity(x[:2], torch.tensor([0.5, 0.5, 0.5]), cond)
    with pytest.raises(TypeError, match="cond must be a FluxConditioning"):
        model.velocity(x[:2], 0.5, {"prompt_embeds": cond.prompt_embeds})


def test_adapter_rejects_bad_sizes(pipe):
    with pytest.raises(ValueError, match="height must be a positive multiple of 2"):
        FluxVelocityModel(pipe.transformer, vae=pipe.vae, height=15, width=16)
    with pytest.raises(ValueError, match="vae.latent_channels=16 does not match"):
        FluxVelocityModel(pipe.transformer, vae=tiny_flux_vae("cpu-bench"), height=16, width=16)


def test_tiny_flux_configs_are_reproducible_and_sized():
    a = tiny_flux_transformer("test", seed=0)
    b = tiny_flux_transformer("test", seed=0)
    c = tiny_flux_transformer("test", seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    bench = tiny_flux_velocity_model("cpu-bench", with_vae=False)
    n_params = sum(p.numel() for p in bench.transformer.parameters())
    assert 1_000_000 < n_params < 10_000_000
    assert bench.seq_len >= 256
    assert tiny_flux_spec("cpu-bench").transformer["num_attention_heads"] == 4
    with pytest.raises(ValueError, match="unknown tiny Flux config name='huge'"):
        tiny_flux_transformer("huge")
    with pytest.raises(ValueError, match="unknown FluxTransformer2DModel config override"):
        tiny_flux_transformer("test", num_layerz=3)
    ids = latent_image_ids(bench.latent_height, bench.latent_width)
    assert ids.shape == (bench.seq_len, 3)

"""Flow maths against diffusers' FluxPipeline / FlowMatchEulerDiscreteScheduler, and the rollout helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from _objective_oracles import ToyVelocity, manual_trajectory, single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.flow import (
    differentiable_rollout,
    euler_step,
    flux_mu,
    flux_sigmas,
    latent_image_ids,
    pack_latents,
    rollout,
    shift_sigmas,
    text_ids,
    uniform_sigmas,
    unpack_latents,
)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# -- pack / unpack / ids: bit for bit ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16, 128, 128), (3, 4, 10, 18), (2, 1, 2, 2)])
def test_pack_unpack_bit_identical_to_flux_pipeline(shape):
    b, c, h, w = shape
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, b, c, h, w))
    vae_scale_factor = 8
    theirs = FluxPipeline._unpack_latents(packed, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
    ours = unpack_latents(packed, h, w)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, latents)


def test_pack_unpack_bit_identical_on_non_contiguous_input():
    base = torch.randn(2, 6, 12, 4, generator=torch.Generator().manual_seed(1))
    latents = base.permute(0, 3, 1, 2)  # [2, 4, 6, 12], non-contiguous
    theirs = FluxPipeline._pack_latents(latents.contiguous(), 2, 4, 6, 12)
    assert torch.equal(pack_latents(latents), theirs)
    packed_t = theirs.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(unpack_latents(packed_t, 6, 12), latents)


@pytest.mark.parametrize("h,w", [(128, 128), (10, 18), (2, 2)])
def test_latent_image_ids_bit_identical_to_flux_pipeline(h, w):
    # FluxPipeline.prepare_latents calls _prepare_latent_image_ids(batch, h // 2, w // 2, ...)
    theirs = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.bfloat16)
    ours = latent_image_ids(h, w, device="cpu", dtype=torch.bfloat16)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_text_ids_are_zeros():
    ids = text_ids(7, dtype=torch.float16)
    assert ids.shape == (7, 3) and ids.dtype == torch.float16 and not ids.any()


def test_pack_and_unpack_reject_bad_shapes():
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 4, 3, 4))
    with pytest.raises(ValueError, match=r"must be \[B, C, H, W\]"):
        pack_latents(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="does not fit a 8x8 latent"):
        unpack_latents(torch.zeros(1, 15, 4), 8, 8)


# -- sigma schedules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 2025, 4096, 8100])
def test_flux_mu_equals_calculate_shift(seq_len):
    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), rel=1e-14, abs=1e-14)


@pytest.mark.parametrize("num_steps,seq_len", [(1, 256), (4, 16), (25, 4096), (28, 2025), (50, 1024)])
def test_flux_sigmas_match_scheduler(num_steps, seq_len):
    """Our float64 schedule equals FlowMatchEulerDiscreteScheduler's (float32) as FluxPipeline drives it."""
    sched = flux_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(seq_len), device="cpu")
    ours = flux_sigmas(num_steps, seq_len)
    assert ours.dtype == torch.float64 and ours.shape == (num_steps + 1,)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.allclose(ours.float(), sched.sigmas.float(), rtol=0, atol=2e-7), (ours, sched.sigmas)
    assert torch.all(ours[1:] < ours[:-1])


def test_uniform_and_static_shift_schedules():
    sig = uniform_sigmas(4)
    assert torch.equal(sig, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = shift_sigmas(sig, mu=np.log(3.0))  # static shift 3: 3 s / (1 + 2 s)
    assert torch.allclose(shifted, 3 * sig / (1 + 2 * sig), atol=1e-15)
    assert torch.equal(flux_sigmas(4, 4096, dynamic_shift=False), sig)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        uniform_sigmas(0)


def test_euler_step_per_sample_sigmas():
    x = torch.ones(2, 3, 4)
    v = torch.full((2, 3, 4), 2.0)
    out = euler_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0]))
    assert torch.equal(out[0], torch.zeros(3, 4)) and torch.equal(out[1], torch.zeros(3, 4))


# -- rollouts ----------------------------------------------------------------------------------------------


def test_rollout_records_the_euler_trajectory_without_graph():
    model = ToyVelocity()
    sigmas = uniform_sigmas(6)
    noise = model.noise(2, torch.Generator().manual_seed(0))
    result = rollout(model, None, noise, sigmas, record=True)
    expected = manual_trajectory(model, None, noise, sigmas)
    assert len(result.trajectory) == 7
    assert all(torch.equal(a, b) for a, b in zip(result.trajectory, expected))
    assert torch.equal(result.x0, expected[-1]) and not result.x0.requires_grad


def test_rollout_taps_reuse_the_forward_and_keep_the_trajectory():
    """Taps run with autograd, the rollout continues with their detached value: same latents, same calls."""
    model = ToyVelocity()
    sigmas = uniform_sigmas(5)
    noise = model.noise(2, torch.Generator().manual_seed(0))
    kept = {}

    def tap(i, x):
        assert torch.is_grad_enabled()
        kept[i] = model.velocity(x, sigmas[i], None)
        return kept[i]

    model.calls = 0
    with torch.no_grad():  # taps get autograd even inside an outer no_grad
        result = rollout(model, None, noise, sigmas, taps={1: tap, 3: tap})
    assert model.calls == 5, "a tap must reuse the rollout's forward, not add one"
    assert torch.equal(result.x0, manual_trajectory(model, None, noise, sigmas)[-1])
    assert kept[1].requires_grad and kept[3].requires_grad


def test_rollout_partial_ranges_compose():
    model = ToyVelocity()
    sigmas = uniform_sigmas(6)
    noise = model.noise(1, torch.Generator().manual_seed(2))
    mid = rollout(model, None, noise, sigmas, stop=4).x0
    end = rollout(model, None, mid, sigmas, start=4).x0
    assert torch.equal(end, rollout(model, None, noise, sigmas).x0)
    with pytest.raises(ValueError, match="tap steps \\[5\\] are outside"):
        rollout(model, None, noise, sigmas, stop=4, taps={5: lambda i, x: x})
    with pytest.raises(ValueError, match="start <= stop"):
        rollout(model, None, noise, sigmas, start=5, stop=3)


def test_differentiable_rollout_gradient_and_checkpointing():
    """Full-chain gradient equals a hand-written autograd loop; checkpointing changes nothing but memory."""
    model = ToyVelocity()
    sigmas = uniform_sigmas(4)
    noise = model.noise(2, torch.Generator().manual_seed(0))

    def grad_of(x0):
        model.zero_grad()
        x0.square().sum().backward()
        return torch.cat([model.W.grad.flatten(), model.b.grad.flatten()])

    x = noise
    for i in range(4):
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * model.velocity(x, sigmas[i], None)
    expected = grad_of(x)
    plain = grad_of(differentiable_rollout(model, None, noise, sigmas))
    ckpt = grad_of(differentiable_rollout(model, None, noise, sigmas, checkpoint=True))
    assert torch.allclose(plain, expected, rtol=1e-12) and torch.allclose(ckpt, expected, rtol=1e-12)
    # detach_model_input drops every dv/dx: gradient = sum_i c_i dv_i/dtheta at the no-grad states
    xs = manual_trajectory(model, None, noise, sigmas)
    stopped = grad_of(differentiable_rollout(model, None, noise, sigmas, detach_model_input=True, train_steps=[2]))
    model.zero_grad()
    s = (sigmas[3] - sigmas[2]).to(noise.dtype) * model.velocity(xs[2], sigmas[2], None)
    (2 * xs[-1] * s).sum().backward()
    assert torch.allclose(stopped, torch.cat([model.W.grad.flatten(), model.b.grad.flatten()]), rtol=1e-12)

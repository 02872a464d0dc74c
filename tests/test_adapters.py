"""What the FLUX.2 and SD3 adapters promise alike, one test per promise parametrised over the family.

(FLUX.1's versions live in test_flux_adapter.py, where checkpointing is also measured in saved bytes.)
"""
from __future__ import annotations

import pytest
import torch

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from leapalign.adapters.flux2 import Flux2Conditioning, Flux2VelocityModel
from leapalign.adapters.sd3 import SD3Conditioning, SD3VelocityModel
from leapalign.adapters.tiny_configs import tiny_flux2_transformer, tiny_flux2_vae, tiny_sd3_transformer, tiny_sd3_vae

H = W = 8  # pixels; the tiny VAEs do not down-sample


def _flux2_cond() -> Flux2Conditioning:
    return Flux2Conditioning(torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)))


def _sd3_cond() -> SD3Conditioning:
    gen = torch.Generator().manual_seed(1)
    return SD3Conditioning(*(torch.randn(s, generator=gen) for s in [(2, 9, 32), (2, 32), (2, 9, 32), (2, 32)]))


# family -> (adapter class, transformer builder, VAE builder, a batch-2 conditioning, image channels without a VAE)
FAMILIES = {
    "flux2": (Flux2VelocityModel, lambda **kw: tiny_flux2_transformer("dev", **kw), tiny_flux2_vae, _flux2_cond, 1),
    "sd3": (SD3VelocityModel, tiny_sd3_transformer, tiny_sd3_vae, _sd3_cond, 4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_without_vae_and_differentiable_decode(family):
    """Without a VAE the unpacked latents are the image; with one, decode passes a gradient."""
    cls, transformer, vae, _, channels = FAMILIES[family]
    model = cls(transformer(), height=H, width=W)
    latents = model.noise(1, torch.Generator().manual_seed(0))
    assert model.decode(latents).shape == (1, channels, H, W)
    with_vae = cls(transformer(), vae=vae(), height=H, width=W)
    latents = latents.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(with_vae.decode(latents).sum(), latents)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_gradients(family):
    cls, transformer, _, cond, _ = FAMILIES[family]
    grads = {}
    for ckpt in (False, True):
        model = cls(transformer(dtype=torch.float64), height=H, width=W, gradient_checkpointing=ckpt)
        x = model.noise(2, torch.Generator().manual_seed(0))
        model.velocity(x, 0.7, cond().to(dtype=torch.float64)).square().sum().backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    assert torch.allclose(grads[True], grads[False], rtol=1e-12, atol=0)


# CFG family -> (a CFG adapter, a batch-2 conditioning with negatives, the negatives as a conditioning of their own)
CFG_FAMILIES = {
    "flux2-klein": (
        lambda: Flux2VelocityModel(tiny_flux2_transformer("klein"), height=H, width=W, guidance=4.0, cfg=True),
        lambda: Flux2Conditioning(*torch.randn(2, 2, 7, 32, generator=torch.Generator().manual_seed(1))),
        lambda cond: Flux2Conditioning(cond.negative_prompt_embeds),
    ),
    "sd3": (
        lambda: SD3VelocityModel(tiny_sd3_transformer(), height=H, width=W, guidance=5.0),
        _sd3_cond,
        lambda cond: SD3Conditioning(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds),
    ),
}


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_cfg_is_one_batched_forward_also_with_grad(family):
    """CFG: one transformer call of batch 2B per velocity, no-grad and grad-enabled alike, and the
    guided velocity is ``v_u + g (v_c - v_u)`` of the two halves."""
    build, make_cond, negatives = CFG_FAMILIES[family]
    model, cond = build(), make_cond()
    guidance = model.guidance
    batches = []
    pre = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        x = model.noise(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            guided = model.velocity(x, 0.5, cond)
        v = model.velocity(x.clone().requires_grad_(True), 0.5, cond)
        v.sum().backward()
    finally:
        pre.remove()
    assert batches == [4, 4] and torch.equal(v.detach(), guided)
    model.guidance = 1.0
    with torch.no_grad():
        v_c = model.velocity(x, 0.5, cond)
        v_u = model.velocity(x, 0.5, negatives(cond))
        per_sample = model.velocity(x, torch.tensor([0.5, 0.5], dtype=torch.float64), cond)
        other_sigma = model.velocity(x, 0.4, cond)
    assert torch.allclose(guided, v_u + guidance * (v_c - v_u), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(guided, v_c)
    assert torch.equal(per_sample, v_c) and not torch.allclose(v_c, other_sigma)

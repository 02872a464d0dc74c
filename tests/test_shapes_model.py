"""Tokenizer, text encoder and the tiny Flux adapter of the shapes world, and the shipped checkpoint."""
from __future__ import annotations

import pytest
import torch

from leapalign.adapters.base import VelocityModel
from leapalign.flow import flux_sigmas
from leapalign.shapes.model import ShapesModelConfig, ShapesVelocityModel, build_shapes_model, load_shapes_model, save_shapes_model
from leapalign.shapes.text import PAD_ID, UNK_ID, ShapesTextEncoder, ShapesTokenizer
from leapalign.shapes.world import eval_prompts, render_batch, sample_specs

SMALL = ShapesModelConfig(num_layers=1, num_single_layers=1)


def test_tokenizer_round_trip_and_unknown_words():
    tok = ShapesTokenizer()
    prompts = [s.text for s in sample_specs(100, seed=0)]
    ids = tok.encode(prompts)
    assert ids.shape == (100, 8) and ids.dtype == torch.long
    assert tok.decode(ids) == prompts
    assert (ids[:, 0] != PAD_ID).all()
    with pytest.raises(ValueError, match="'dog'"):
        tok.encode(["a red dog"])
    assert tok.encode(["a red dog"], strict=False)[0, 2] == UNK_ID
    with pytest.raises(ValueError, match="at most 8"):
        tok.encode(["a red circle left of a blue square and"])
    with pytest.raises(TypeError, match="single str"):
        tok.encode("a circle")


def test_text_encoder_shapes_and_pooling_ignores_padding_positions():
    torch.manual_seed(0)
    enc = ShapesTextEncoder().eval()
    ids = ShapesTokenizer().encode(["a circle", "three squares", "a red circle above a blue square"])
    hidden, pooled = enc(ids)
    assert hidden.shape == (3, 8, 64) and pooled.shape == (3, 64)
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    # Different prompts must give different conditioning (the encoder is not a constant).
    assert (pooled[0] - pooled[1]).abs().max() > 1e-4


def test_adapter_satisfies_protocol_and_codec_is_exact():
    model = build_shapes_model(SMALL, seed=0)
    assert isinstance(model, VelocityModel)
    images = render_batch(eval_prompts(4, seed=0), seed=0)
    latents = model.encode_images(images)
    assert latents.shape == (4, 64, 48)
    torch.testing.assert_close(model.decode(latents), images, rtol=0, atol=1e-6)
    # Pixel (0, 0) of image 0 lands in token 0; pixel (0, 31) in the last token of the first row.
    assert torch.equal(latents[0, 0, :3], images[0, :, 0, 0] * 2 - 1)


def test_noise_sigmas_and_velocity():
    model = build_shapes_model(SMALL, seed=0)
    a = model.noise(3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 64, 48) and torch.equal(a, model.noise(3, torch.Generator().manual_seed(1)))
    sig = model.sigmas(10)
    assert sig.shape == (11,) and sig.dtype == torch.float64 and sig[0] == 1 and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    torch.testing.assert_close(sig, flux_sigmas(10, seq_len=64))
    cond = model.encode_prompts(["a circle", "two squares", "a red circle above a blue square"])
    v = model.velocity(a, torch.tensor([1.0, 0.5, 0.1]), cond)
    assert v.shape == a.shape and torch.isfinite(v).all()
    torch.testing.assert_close(model.velocity(a, 0.5, cond), model.velocity(a, torch.full((3,), 0.5), cond))
    with pytest.raises(ValueError, match="batch"):
        model.velocity(a[:2], 0.5, cond)
    with pytest.raises(TypeError, match="ShapesConditioning"):
        model.velocity(a, 0.5, cond.prompt_embeds)


def test_gradient_reaches_transformer_not_frozen_text_encoder():
    model = build_shapes_model(SMALL, seed=0)
    cond = model.encode_prompts(["a circle", "a square"])
    x = model.noise(2, torch.Generator().manual_seed(0))
    img = model.decode(x - 0.5 * model.velocity(x, 0.5, cond))
    img.mean().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert len(model.trainable_parameters()) == len(list(model.transformer.parameters()))


def test_save_load_round_trip(tmp_path):
    model = build_shapes_model(SMALL, seed=3)
    save_shapes_model(model, tmp_path, meta={"note": "test"})
    loaded = load_shapes_model(tmp_path)
    cond_a = model.encode_prompts(["a blue triangle"])
    cond_b = loaded.encode_prompts(["a blue triangle"])
    x = model.noise(1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.velocity(x, 0.3, cond_b), model.velocity(x, 0.3, cond_a))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        load_shapes_model(tmp_path / "missing")


def test_shipped_checkpoint_loads_and_samples_finite_images():
    model = load_shapes_model()
    assert isinstance(model, ShapesVelocityModel) and not model.training
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    prompts = [s.text for s in eval_prompts(6, seed=0)]
    images = model.sample(prompts, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    # A trained model paints a mostly-background canvas, not noise: the median pixel is near white.
    assert images.median() > 0.8

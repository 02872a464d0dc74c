"""A complete tiny ``FluxPipeline`` built in code (no downloads) for the trainer/CLI tests.

Transformer and VAE: H1's ``tiny_flux`` "test" spec. Text encoders: tiny random CLIP and T5
encoders; tokenizers: a word-level ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``.
Images are 16x16 (latent 16x16 with the tiny VAE's scale factor 1): 64 packed tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "blue", "green", "cat", "dog", "circle", "square", "photo", "of", "big", "small"]
PROMPTS = ["a red cat", "a blue dog", "a green circle", "a big square", "a small red dog", "photo of a cat"]
HEIGHT = WIDTH = 16
MAX_SEQ = 8


def tiny_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` of tiny random models (float32, CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from leapalign.models.tiny_flux import tiny_flux_transformer, tiny_flux_vae

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=MAX_SEQ, projection_dim=32,
                                        eos_token_id=3, pad_token_id=0, bos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_flux_vae("test", seed=seed + 1),
        text_encoder=clip.eval(),
        tokenizer=tiny_tokenizer(MAX_SEQ),
        text_encoder_2=t5.eval(),
        tokenizer_2=tiny_tokenizer(MAX_SEQ),
        transformer=tiny_flux_transformer("test", seed=seed),
    )


def save_tiny_flux_pipeline(path: Path, seed: int = 0) -> Path:
    pipe = tiny_flux_pipeline(seed)
    pipe.save_pretrained(str(path))
    return path


def tiny_config(output_dir: Path, **overrides):
    """A LeapAlignConfig for the tiny pipeline: 4-step rollouts, brightness reward, CPU fp32."""
    from leapalign.training.config import LeapAlignConfig

    base = dict(
        output_dir=str(output_dir), seed=0, device="cpu", model_dtype="float32", model_height=HEIGHT, model_width=WIDTH,
        model_max_sequence_length=MAX_SEQ, prompts=list(PROMPTS), objective_name="leapalign",
        objective={"num_steps": 4, "hinge_lambda": None, "alpha": 0.3},
        reward_specs=[{"name": "brightness"}], train_num_steps=4, train_batch_size=2, train_learning_rate=1e-3,
        train_ema_decay=0.9, lora_rank=4, ckpt_every=0, ckpt_save_final=False, sample_every=0,
    )
    base.update(overrides)
    return LeapAlignConfig(**base)


def detached_reward(images, prompts):
    """A reward that forgets its gradient (``.detach()``): the trainer must refuse it by name."""
    return images.float().mean(dim=(1, 2, 3)).detach()


def broken_reward_factory(path=None, **kwargs):
    """A ``module:attr`` reward factory that fails when constructed."""
    raise ValueError(f"cannot open the reward model at {path!r}")

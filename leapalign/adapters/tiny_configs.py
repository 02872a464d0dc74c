"""Tiny FLUX.2 and SD3 pipelines built from configs in code (no download, DESIGN §5).

The shapes follow diffusers' own fast-test components for ``Flux2KleinPipeline`` and
``StableDiffusion3Pipeline``; weights are redrawn from a private seeded generator, so the same
``(seed, dtype)`` always gives bit-identical models. Text encoders are tiny random ``Qwen3ForCausalLM``
(FLUX.2 klein), ``CLIPTextModelWithProjection`` x 2 and ``T5EncoderModel`` (SD3) with byte-level
tokenizers built in memory, so each pipeline's own ``encode_prompt`` runs end to end. FLUX.2-dev
gets a tiny random ``Mistral3ForConditionalGeneration``; its Pixtral processor needs torchvision, so a
byte-level tokenizer with a chat template stands in (the pipeline only calls its
``apply_chat_template`` for text prompts).

- FLUX.2: 1 double + 1 single block, 2 heads x 16, 4 transformer channels (= 1 VAE latent channel
  patchified 2x2), a one-level ``AutoencoderKLFlux2`` (no down-sampling) with non-trivial batch-norm
  statistics. An ``H x W`` image has ``(H/2)(W/2)`` tokens. ``variant``: ``"dev"`` (guidance
  embeddings, ``Flux2Pipeline``), ``"klein"`` (no guidance embeddings, true CFG,
  ``Flux2KleinPipeline``), ``"klein-distilled"`` (klein with ``is_distilled=True``: no CFG).
- SD3: 2 joint blocks (the first with SD3.5's dual attention), RMS QK-norm (SD3.5), 2 heads x 8,
  patch 2, 4 latent channels, a one-level ``AutoencoderKL`` (no down-sampling). An ``H x W`` image
  has ``(H/2)(W/2)`` tokens of 16 channels.
"""
from __future__ import annotations

from typing import Any

import torch


__all__ = [
    "FLUX2_VARIANTS",
    "FLUX2_TEXT_LAYERS",
    "tiny_flux2_transformer",
    "tiny_flux2_vae",
    "tiny_flux2_pipeline",
    "tiny_sd3_transformer",
    "tiny_sd3_vae",
    "tiny_sd3_pipeline",
    "flux2_scheduler",
    "sd3_scheduler",
    "byte_level_vocab",
    "tiny_transformer_config",
    "tiny_vae_config",
]

FLUX2_VARIANTS = ("dev", "klein", "klein-distilled")
FLUX2_TEXT_LAYERS = (1, 2)  # hidden states stacked by the tiny Qwen3 encoder (2 layers x 16 = 32 dims)

_FLUX2_TRANSFORMER = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
)
_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
# both VAEs: one level (no down-sampling), 4 channels, one group, no quant convs
_ONE_LEVEL_VAE = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, norm_num_groups=1,
    use_quant_conv=False, use_post_quant_conv=False,
)
_FLUX2_VAE = dict(
    _ONE_LEVEL_VAE, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), latent_channels=1
)
_SD3_VAE = dict(_ONE_LEVEL_VAE, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_transformer_config(family: str, variant: str = "klein") -> dict[str, Any]:
    """The tiny transformer's diffusers config (``family``: ``"flux2"`` with a FLUX.2 ``variant``, or ``"sd3"``)."""
    if family == "sd3":
        return dict(_SD3_TRANSFORMER)
    if family != "flux2" or variant not in FLUX2_VARIANTS:
        raise ValueError(f"no tiny config for family={family!r}, variant={variant!r}; expected sd3 or flux2 with {FLUX2_VARIANTS}")
    return dict(_FLUX2_TRANSFORMER, guidance_embeds=variant == "dev")


def tiny_vae_config(family: str) -> dict[str, Any]:
    """The tiny VAE's diffusers config (``AutoencoderKLFlux2`` for ``"flux2"``, ``AutoencoderKL`` for ``"sd3"``)."""
    if family not in ("flux2", "sd3"):
        raise ValueError(f"no tiny VAE config for family={family!r}; expected flux2 or sd3")
    return dict(_FLUX2_VAE if family == "flux2" else _SD3_VAE)


def _seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a private generator: N(0, 0.02) matrices, 1 + N(0, 0.01) norm
    scales, N(0, 0.01) other vectors -- reproducible, non-trivial, every parameter gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.02 if p.ndim >= 2 else 0.01
            values = std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim == 1 and name.endswith("weight") and "norm" in name:
                values += 1.0
            p.copy_(values.to(p.dtype))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` by ``torch.nn.Module.to`` itself: diffusers' and transformers' overrides only add
    checks for quantised checkpoints and a keep-in-float32 warning for ``from_pretrained`` users (nothing
    in these freshly built models is quantised or must stay float32)."""
    return torch.nn.Module.to(module, dtype)


def _with_overrides(base: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = set(overrides) - set(base) - {"out_channels", "guidance_embeds", "mlp_ratio", "eps", "rope_theta"}
    if unknown:
        raise ValueError(f"unknown {what} config override(s) {sorted(unknown)}; known: {sorted(base)}")
    return {**base, **overrides}


def _seeded_vae(vae: torch.nn.Module, seed: int) -> None:
    """Fan-in-scaled normal weights, unit norm scales, zero biases (as tiny_flux's VAE)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) / p[0].numel() ** 0.5).to(p.dtype))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


# -- FLUX.2 ------------------------------------------------------------------------------------------


def tiny_flux2_transformer(variant: str = "dev", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A ``Flux2Transformer2DModel``; ``variant="dev"`` has guidance embeddings, the klein ones do not."""
    from diffusers import Flux2Transformer2DModel

    if variant not in FLUX2_VARIANTS:
        raise ValueError(f"unknown tiny FLUX.2 variant={variant!r}; expected one of {FLUX2_VARIANTS}")
    config = _with_overrides(_FLUX2_TRANSFORMER, overrides, "Flux2Transformer2DModel")
    config.setdefault("guidance_embeds", variant == "dev")
    model = Flux2Transformer2DModel(**config)
    _seeded_init(model, seed)
    return _cast(model, dtype).eval()


def tiny_flux2_vae(dtype: torch.dtype = torch.float32, seed: int = 1):
    """A one-level ``AutoencoderKLFlux2`` whose batch-norm statistics are not the identity."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**_FLUX2_VAE)
    _seeded_vae(vae, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the decode path de-normalises with these: make them matter
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
    vae.requires_grad_(False)
    return _cast(vae, dtype).eval()


def flux2_scheduler():
    """FLUX.2's scheduler config: dynamic (exponential) shifting; the pipeline supplies the empirical mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )


def byte_level_vocab(extra: tuple[str, ...] = ()) -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet as a vocabulary (every byte one token, no merges) + ``extra``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + n))
            n += 1
    vocab = {c: i for i, c in enumerate(chars)}
    for token in extra:
        vocab[token] = len(vocab)
    return vocab


def _tiny_qwen3(seed: int, layers: int = 2):
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = Qwen2Tokenizer(vocab=byte_level_vocab(("<|endoftext|>",)), merges=[])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
    )
    encoder = Qwen3ForCausalLM(config)
    _seeded_init(encoder, seed)
    return encoder.eval(), tokenizer


def _tiny_mistral3(seed: int, layers: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig, PreTrainedTokenizerFast

    vocab = byte_level_vocab(("<unk>", "<s>", "</s>", "[IMG]", "<pad>"))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}[{{ m['role'] }}]{{ c['text'] }}{% endfor %}{% endfor %}"
    )
    config = Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        ),
        vision_config=PixtralVisionConfig(
            hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, head_dim=8, image_size=16,
            patch_size=4,
        ),
        image_token_index=vocab["[IMG]"],
        spatial_merge_size=1,
    )
    encoder = Mistral3ForConditionalGeneration(config)
    _seeded_init(encoder, seed)
    return encoder.eval(), tokenizer


def tiny_flux2_pipeline(
    variant: str = "dev",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_text_encoder: bool = True,
    scheduler: Any = None,
    pipeline_text_layers: bool = False,
):
    """A ``Flux2Pipeline`` (``"dev"``) or ``Flux2KleinPipeline`` (klein variants) of tiny random models.

    With ``with_text_encoder`` dev gets a tiny Mistral-3 and klein a tiny Qwen3 (2 layers x 16 dims:
    call the pipeline and the adapter with ``text_encoder_out_layers=FLUX2_TEXT_LAYERS``). With
    ``pipeline_text_layers`` the encoder is deep enough for the pipeline's own default layers (dev:
    10, 20, 30; klein: 9, 18, 27) and the transformer takes their 3 x 16 = 48 stacked dims, so code
    that cannot pass ``text_encoder_out_layers`` (the trainer, the CLI) runs the pipeline's defaults.
    """
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    overrides = dict(joint_attention_dim=48) if pipeline_text_layers else {}
    layers = (30 if variant == "dev" else 27) if pipeline_text_layers else 2
    transformer = tiny_flux2_transformer(variant, dtype=dtype, seed=seed, **overrides)
    vae = tiny_flux2_vae(dtype=dtype, seed=seed + 1)
    scheduler = scheduler if scheduler is not None else flux2_scheduler()
    build = _tiny_mistral3 if variant == "dev" else _tiny_qwen3
    encoder, tokenizer = build(seed + 2, layers) if with_text_encoder else (None, None)
    if encoder is not None:
        encoder = _cast(encoder, dtype)
    if variant == "dev":
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=variant == "klein-distilled",
    )


# -- SD3 ---------------------------------------------------------------------------------------------


def tiny_sd3_transformer(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """An ``SD3Transformer2DModel`` with SD3.5's features (dual attention in block 0, RMS QK-norm)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**_with_overrides(_SD3_TRANSFORMER, overrides, "SD3Transformer2DModel"))
    _seeded_init(model, seed)
    return _cast(model, dtype).eval()


def tiny_sd3_vae(dtype: torch.dtype = torch.float32, seed: int = 1):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**_SD3_VAE)
    _seeded_vae(vae, seed)
    vae.requires_grad_(False)
    return _cast(vae, dtype).eval()


def sd3_scheduler():
    """SD3 / SD3.5's scheduler config: static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _tiny_sd3_text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    vocab = byte_level_vocab()
    clip_vocab = dict(vocab)
    clip_vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(vocab)})
    for token in ("<|startoftext|>", "<|endoftext|>"):
        clip_vocab[token] = len(clip_vocab)
    clip_len = 12
    encoders = []
    for k in range(2):
        tokenizer = CLIPTokenizer(vocab=dict(clip_vocab), merges=[], model_max_length=clip_len)
        config = CLIPTextConfig(
            vocab_size=len(clip_vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=clip_len, projection_dim=16, bos_token_id=clip_vocab["<|startoftext|>"],
            eos_token_id=clip_vocab["<|endoftext|>"], pad_token_id=clip_vocab["<|endoftext|>"],
        )
        encoder = CLIPTextModelWithProjection(config)
        _seeded_init(encoder, seed + k)
        encoders.append((encoder.eval(), tokenizer))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁,."]
    t5_tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    )
    _seeded_init(t5, seed + 2)
    return encoders, (t5.eval(), t5_tokenizer)


def tiny_sd3_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0, with_text_encoders: bool = True, scheduler: Any = None):
    """A ``StableDiffusion3Pipeline`` of tiny random models (CLIP x 2 + T5 built in memory when asked).

    Prompt embeddings are ``[B, 12 + L_t5, 32]`` (CLIP's 12 tokens padded to T5's width, then T5's
    tokens), pooled embeddings ``[B, 32]`` (two 16-dim CLIP projections).
    """
    from diffusers import StableDiffusion3Pipeline

    transformer = tiny_sd3_transformer(dtype=dtype, seed=seed)
    vae = tiny_sd3_vae(dtype=dtype, seed=seed + 1)
    scheduler = scheduler if scheduler is not None else sd3_scheduler()
    parts: dict[str, Any] = dict(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None
    )
    if with_text_encoders:
        clips, (t5, tok3) = _tiny_sd3_text_encoders(seed + 2)
        (clip1, tok1), (clip2, tok2) = clips
        parts = dict(
            text_encoder=_cast(clip1, dtype), tokenizer=tok1, text_encoder_2=_cast(clip2, dtype), tokenizer_2=tok2,
            text_encoder_3=_cast(t5, dtype), tokenizer_3=tok3,
        )
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **parts)

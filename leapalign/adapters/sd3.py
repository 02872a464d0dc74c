"""Adapter: a diffusers ``SD3Transformer2DModel`` (+ ``AutoencoderKL``) as a :class:`VelocityModel`.

Reproduces ``StableDiffusion3Pipeline`` sampling (SD3 medium, SD3.5 medium/large) bit for bit:

- **classifier-free guidance**: ``v = v_u + g (v_c - v_u)``, unconditional and conditional in ONE
  batched forward (``[uncond; cond]``, the pipeline's order) at every step -- grad-enabled steps
  included, since the guided velocity is the one the method leaps with. ``g <= 1``: one forward.
- latents: noise drawn as the pipeline's ``[B, c, H/f, W/f]``; the protocol's tokens are the
  transformer's own ``p x p`` patches, ``[B, (h/p)(w/p), c p^2]`` (Flux's 2x2 packing for p = 2).
  Packing only moves elements, so Euler steps on tokens equal the pipeline's on ``[B, c, h, w]``.
- the schedule: the pipeline passes no sigmas, so the scheduler spaces its own
  ``linspace(sigma_max, sigma_min, T)`` and shifts it (SD3: static shift 3; a dynamic config gets
  ``mu`` from the image sequence length), reproduced exactly by
  :class:`~leapalign.adapters.schedules.FlowMatchSchedule`. ``timestep = float32(sigma) * 1000``,
  passed as is (SD3's transformer takes the 0..1000 scale).
- decode: unpack -> ``z / scaling_factor + shift_factor`` -> ``vae.decode`` ->
  ``(x * 0.5 + 0.5).clamp(0, 1)``. Without a VAE the unpacked latents are the image (``c`` channels).
- not supported (the pipeline call's extras, not the model's): skip-layer guidance, IP-adapter images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from leapalign.adapters.base import BatchedConditioning, TransformerVelocityModel, per_sample_timestep, require_class
from leapalign.adapters.prompt_cache import PromptEmbeddingCache
from leapalign.adapters.schedules import FlowMatchSchedule

__all__ = ["SD3Conditioning", "SD3VelocityModel", "SD3_PIPELINES"]

SD3_PIPELINES = ("StableDiffusion3Pipeline",)
_SD3_SCHEDULE = FlowMatchSchedule(shift=3.0)  # SD3 / SD3.5 scheduler config


@dataclass
class SD3Conditioning(BatchedConditioning):
    """Text conditioning for one micro-batch of SD3.

    ``prompt_embeds [B, L, D]`` (CLIP-L + CLIP-G hidden states padded to T5's width, then T5's),
    ``pooled_prompt_embeds [B, P]``; the negatives, same shapes, for classifier-free guidance.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.check_embeds(self.prompt_embeds, self.pooled_prompt_embeds)
        neg, neg_pooled = self.negative_prompt_embeds, self.negative_pooled_prompt_embeds
        if (neg is None) != (neg_pooled is None):
            raise ValueError("negative_prompt_embeds and negative_pooled_prompt_embeds must be given together")
        if neg is not None and (neg.shape != self.prompt_embeds.shape or neg_pooled.shape != self.pooled_prompt_embeds.shape):
            raise ValueError(
                f"negative embeddings must have the shapes of the prompt's {tuple(self.prompt_embeds.shape)} and "
                f"{tuple(self.pooled_prompt_embeds.shape)}, got {tuple(neg.shape)} and {tuple(neg_pooled.shape)}: "
                "classifier-free guidance runs both in one batched forward"
            )

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None


class SD3VelocityModel(TransformerVelocityModel):
    """``v(x, sigma | cond)`` for a diffusers ``SD3Transformer2DModel`` over patch tokens ``[B, N, C]``.

    Args:
        transformer: the ``SD3Transformer2DModel`` (its ``requires_grad`` flags decide what trains).
        vae: an ``AutoencoderKL`` or ``None`` (latents are pixels; see the module docstring).
        height, width: image size in pixels, multiples of ``f p`` (VAE scale factor, patch size).
        guidance: the classifier-free guidance scale (the pipeline's ``guidance_scale``; CFG when > 1).
        schedule: the scheduler's schedule config (default SD3's static shift 3).
        gradient_checkpointing: recompute each transformer block in backward on grad-enabled calls.
        clamp_images: clamp decoded VAE images to [0, 1] like the pipeline.
    """

    conditioning = SD3Conditioning
    conditioning_name = "an SD3Conditioning"
    token_name = "patch tokens"

    def __init__(
        self, transformer: torch.nn.Module, vae: torch.nn.Module | None = None, height: int = 1024, width: int = 1024,
        guidance: float = 7.0, schedule: FlowMatchSchedule | None = None,
        gradient_checkpointing: bool = False, gradient_checkpointing_func: Callable[..., Any] | None = None,
        clamp_images: bool = True,
    ) -> None:
        require_class("transformer", transformer, "SD3Transformer2DModel", "an")
        cfg = transformer.config
        if cfg.out_channels not in (None, cfg.in_channels):
            raise ValueError(
                f"SD3Transformer2DModel with in_channels={cfg.in_channels}, out_channels={cfg.out_channels} is not "
                "supported; a velocity needs out_channels = in_channels"
            )
        self.guidance = float(guidance)
        self.schedule = schedule if schedule is not None else _SD3_SCHEDULE
        self.clamp_images = clamp_images
        self.latent_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        if vae is not None and vae.config.latent_channels != self.latent_channels:
            raise ValueError(
                f"vae.latent_channels={vae.config.latent_channels} does not match transformer "
                f"in_channels={self.latent_channels}"
            )
        self.vae_scale_factor = self.vae_scale_factor_of(vae)
        multiple = self.vae_scale_factor * self.patch_size
        self._setup(transformer, vae, height, width, multiple, "vae scale factor x patch size",
                    gradient_checkpointing, gradient_checkpointing_func)
        self.latent_height = self.height // self.vae_scale_factor
        self.latent_width = self.width // self.vae_scale_factor
        grid = max(self.latent_height, self.latent_width) // self.patch_size
        if cfg.pos_embed_max_size is not None and grid > cfg.pos_embed_max_size:
            raise ValueError(
                f"a {self.height}x{self.width} image is {grid} patches across, more than the transformer's "
                f"pos_embed_max_size={cfg.pos_embed_max_size}; the largest it can serve is "
                f"{cfg.pos_embed_max_size * multiple} pixels a side"
            )
        self.seq_len = (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)
        self.channels = self.latent_channels * self.patch_size**2
        self.prompt_cache: PromptEmbeddingCache | None = None
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pipeline(
        cls, pipe: Any, height: int = 1024, width: int = 1024, guidance: float = 7.0, max_sequence_length: int = 256,
        negative_prompt: str = "", **kwargs: Any,
    ) -> "SD3VelocityModel":
        """Wrap a ``StableDiffusion3Pipeline``: transformer, VAE, schedule and its text path.

        ``encode_prompts`` then runs the pipeline's own ``encode_prompt`` (cached per prompt; T5
        truncated at ``max_sequence_length``; without ``text_encoder_3`` the pipeline's zeros). The
        ``negative_prompt`` is encoded here, once, so CFG still works after ``release_text_encoders()``.
        """
        cls.pipeline_class(pipe, SD3_PIPELINES, "an SD3")
        kwargs.setdefault("schedule", FlowMatchSchedule.from_scheduler(pipe.scheduler))
        model = cls(pipe.transformer, vae=getattr(pipe, "vae", None), height=height, width=width, guidance=guidance, **kwargs)
        if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "text_encoder_2", None) is not None:

            def encode(prompts: list[str]) -> tuple[torch.Tensor, ...]:
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, prompt_3=None, device=next(pipe.text_encoder.parameters()).device,
                    num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                )
                return embeds, pooled

            model.prompt_cache = PromptEmbeddingCache(
                encode, pipe, ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
            )
            embeds, pooled = model.prompt_cache.get([negative_prompt])
            model._negative = (embeds[0], pooled[0])
        return model

    # -- VelocityModel protocol -------------------------------------------------------------------
    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance on: ``guidance > 1`` (the pipeline's rule)."""
        return self.guidance > 1

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """``[B, c, h, w]``, as ``StableDiffusion3Pipeline.prepare_latents`` draws its noise (then patch tokens)."""
        return (batch_size, self.latent_channels, self.latent_height, self.latent_width)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule for ``num_steps``: the scheduler's exact float32 sigmas, final 0."""
        mu = self.schedule.dynamic_mu(self.seq_len) if self.schedule.use_dynamic_shifting else None
        return self.schedule.sigmas(num_steps, mu=mu)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: SD3Conditioning) -> torch.Tensor:
        batch = self.check_inputs(x, cond)
        timestep = per_sample_timestep(FlowMatchSchedule.timesteps(torch.as_tensor(sigma, device=x.device)), batch)
        latents = self.unpack(x)
        if self.do_cfg:
            self.require_negatives(cond.has_negative, "the negative embeddings in cond")
            out = self.guided(self.transformer(
                hidden_states=torch.cat([latents] * 2),
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
                pooled_projections=torch.cat([cond.negative_pooled_prompt_embeds, cond.pooled_prompt_embeds]),
                return_dict=False,
            )[0])
        else:
            out = self.transformer(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds, return_dict=False,
            )[0]
        # under autocast the network answers in bf16; the rollout state keeps its own dtype
        return self.pack(out).to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.unpack(latents)
        if self.vae is None:
            return z
        vcfg = self.vae.config
        return self.vae_images(z / vcfg.scaling_factor + (vcfg.shift_factor or 0.0))

    # -- prompts ----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> SD3Conditioning:
        """The pipeline's ``encode_prompt`` for ``prompts`` (cached per prompt) with the cached negative."""
        embeds, pooled = self.cached_prompts(prompts, "the pipeline's CLIP text encoders")
        neg, neg_pooled = (t.to(self.device, self.dtype) for t in self._negative)
        return SD3Conditioning(embeds, pooled, neg.expand_as(embeds), neg_pooled.expand_as(pooled))

    # -- packing ----------------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, c, h, w] -> [B, (h/p)(w/p), c p^2]``: one token per transformer patch."""
        b, c, h, w = latents.shape
        p = self.patch_size
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``[B, N, C] -> [B, c, h, w]`` (contiguous, as the pipeline's latents)."""
        b, n, c = packed.shape
        p, h, w = self.patch_size, self.latent_height, self.latent_width
        if n != (h // p) * (w // p):
            raise ValueError(f"packed latents have {n} tokens, expected {(h // p) * (w // p)}")
        x = packed.reshape(b, h // p, w // p, c // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c // (p * p), h, w).contiguous()

    def __repr__(self) -> str:
        return (
            f"SD3VelocityModel(image={self.height}x{self.width}, latent={self.latent_height}x{self.latent_width}, "
            f"tokens={self.seq_len}, guidance={self.guidance} ({'cfg' if self.do_cfg else 'none'}), "
            f"vae={self.describe_vae()}, checkpointing={self.gradient_checkpointing})"
        )

"""Adapter: a diffusers ``FluxTransformer2DModel`` (+ optional VAE) as a :class:`VelocityModel`.

What the adapter owns, so objectives never see Flux specifics:

- ``timestep = sigma`` (the transformer multiplies by 1000 inside), a per-sample ``guidance``
  tensor when ``transformer.config.guidance_embeds`` (FLUX.1-dev: 3.5, one forward per step, no CFG
  doubling), 2-D ``img_ids``/``txt_ids``, pooled projections.
- the training sigma schedule (DESIGN §2: ``linspace(1, 1/T, T)``, Flux dynamic shift from the
  packed sequence length, final 0), computed in float64 by :mod:`leapalign.flow`.
- decode: unpack -> ``latents / scaling_factor + shift_factor`` -> ``vae.decode`` ->
  ``(x / 2 + 0.5).clamp(0, 1)``, exactly as ``FluxPipeline`` + ``VaeImageProcessor`` do.
  **Without a VAE** the packed latents are unpacked and returned as the image unchanged ("latents
  are pixels"; ``C/4`` channels, no clamp): tiny test models and toy worlds use it.
- optional per-block gradient checkpointing through diffusers'
  ``enable_gradient_checkpointing(gradient_checkpointing_func=...)`` hook. diffusers only
  checkpoints when autograd is on, so the no-grad rollout steps are unaffected and only the
  grad-enabled calls (LeapAlign's two) recompute their blocks in backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from leapalign.adapters.base import BatchedConditioning, TransformerVelocityModel, checkpoint_block, per_sample_timestep
from leapalign.flow import flux_mu, flux_sigmas, latent_image_ids, pack_latents, text_ids, unpack_latents

__all__ = ["FluxConditioning", "FluxVelocityModel", "checkpoint_block"]


@dataclass
class FluxConditioning(BatchedConditioning):
    """Text conditioning for one micro-batch.

    ``prompt_embeds [B, L, D]`` (T5 hidden states), ``pooled_prompt_embeds [B, P]`` (CLIP pooled);
    ``text_ids [L, 3]`` defaults to Flux's all-zero ids. Batch sizes are checked here and against the
    latents at every velocity call.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.check_embeds(self.prompt_embeds, self.pooled_prompt_embeds)
        self.text_ids = self.shared_ids(self.text_ids, self.prompt_embeds.shape[1], 3)


class FluxVelocityModel(TransformerVelocityModel):
    """``v(x, sigma | cond)`` for a diffusers ``FluxTransformer2DModel`` over packed latents ``[B, N, C]``.

    Args:
        transformer: the ``FluxTransformer2DModel`` (its ``requires_grad`` flags decide what trains).
        vae: an ``AutoencoderKL`` or ``None`` (latents are pixels; see the module docstring).
        height, width: image size in pixels. With a VAE of scale factor ``f`` the latent is
            ``2 * (height // (2 f))`` (FluxPipeline's rounding; sizes must be multiples of ``2 f``).
        guidance: the distilled-guidance scale passed per sample when the model has guidance
            embeddings (ignored otherwise).
        gradient_checkpointing: recompute each transformer block in backward on grad-enabled calls.
        dynamic_shift / mu / base_seq_len / max_seq_len / base_shift / max_shift: the sigma schedule
            (defaults are FLUX.1's scheduler config).
        clamp_images: clamp decoded VAE images to [0, 1] like the pipeline (gradient is zero outside).
    """

    conditioning = FluxConditioning
    conditioning_name = "a FluxConditioning"

    def __init__(
        self, transformer: torch.nn.Module, vae: torch.nn.Module | None = None, height: int = 1024, width: int = 1024,
        guidance: float = 3.5, gradient_checkpointing: bool = False,
        gradient_checkpointing_func: Callable[..., Any] | None = None, dynamic_shift: bool = True,
        mu: float | None = None, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
        max_shift: float = 1.15, clamp_images: bool = True,
    ) -> None:
        self.guidance = float(guidance)
        self.dynamic_shift = dynamic_shift
        self.clamp_images = clamp_images
        self._shift = dict(
            base_seq_len=base_seq_len, max_seq_len=max_seq_len, base_shift=base_shift, max_shift=max_shift
        )
        self.mu = mu

        cfg = transformer.config
        if cfg.patch_size != 1:
            raise ValueError(f"only patch_size=1 Flux transformers are supported, got patch_size={cfg.patch_size}")
        if cfg.in_channels % 4:
            raise ValueError(f"transformer in_channels must be 4 x latent channels, got {cfg.in_channels}")
        self.latent_channels, self.channels = cfg.in_channels // 4, cfg.in_channels
        if vae is not None and vae.config.latent_channels != self.latent_channels:
            raise ValueError(
                f"vae.latent_channels={vae.config.latent_channels} does not match transformer in_channels/4="
                f"{self.latent_channels}"
            )
        self.vae_scale_factor = self.vae_scale_factor_of(vae)
        multiple = 2 * self.vae_scale_factor
        self._setup(transformer, vae, height, width, multiple, "2 x vae scale factor",
                    gradient_checkpointing, gradient_checkpointing_func)
        self.latent_height = 2 * (self.height // multiple)
        self.latent_width = 2 * (self.width // multiple)
        self.seq_len = (self.latent_height // 2) * (self.latent_width // 2)
        self._img_ids: torch.Tensor | None = None

    @classmethod
    def from_pipeline(cls, pipe: Any, height: int = 1024, width: int = 1024, **kwargs: Any) -> "FluxVelocityModel":
        """Wrap a diffusers ``FluxPipeline``'s transformer and VAE, reading the shift from its scheduler.

        Dynamic shifting (FLUX.1-dev) uses the scheduler's base/max sequence lengths and shifts; a
        static scheduler ``shift`` s (``use_dynamic_shifting=False``) becomes ``mu = ln s`` (the same
        map ``s sigma / (1 + (s - 1) sigma)``). ``kwargs`` override any of these.
        """
        sched = getattr(pipe, "scheduler", None)
        scfg = getattr(sched, "config", {}) or {}
        dynamic = bool(scfg.get("use_dynamic_shifting", True))
        defaults: dict[str, Any] = dict(
            base_seq_len=scfg.get("base_image_seq_len", 256),
            max_seq_len=scfg.get("max_image_seq_len", 4096),
            base_shift=scfg.get("base_shift", 0.5),
            max_shift=scfg.get("max_shift", 1.15),
            dynamic_shift=dynamic,
        )
        static_shift = float(scfg.get("shift", 1.0))
        if not dynamic and static_shift != 1.0:
            defaults["mu"] = math.log(static_shift)
        defaults.update(kwargs)
        return cls(pipe.transformer, vae=getattr(pipe, "vae", None), height=height, width=width, **defaults)

    # -- VelocityModel protocol -------------------------------------------------------------------
    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """``[B, C, h, w]``, as ``FluxPipeline.prepare_latents`` draws its noise before packing."""
        return (batch_size, self.latent_channels, self.latent_height, self.latent_width)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        mu = self.mu
        if mu is None and self.dynamic_shift:
            mu = flux_mu(self.seq_len, **self._shift)
        return flux_sigmas(num_steps, self.seq_len, dynamic_shift=self.dynamic_shift, mu=mu)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: FluxConditioning) -> torch.Tensor:
        batch = self.check_inputs(x, cond)
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        timestep = per_sample_timestep(torch.as_tensor(sigma, dtype=t_dtype, device=x.device), batch)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, dtype=t_dtype, device=x.device)
        ids = cond.text_ids
        if ids is None:
            ids = text_ids(cond.prompt_embeds.shape[1], device=x.device, dtype=x.dtype)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=timestep,
            img_ids=self.image_ids(x),
            txt_ids=ids.to(device=x.device, dtype=x.dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        # under autocast the network answers in bf16; the rollout state keeps its own dtype
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        unpacked = unpack_latents(latents, self.latent_height, self.latent_width)
        if self.vae is None:
            return unpacked
        vcfg = self.vae.config
        return self.vae_images(unpacked / vcfg.scaling_factor + (vcfg.shift_factor or 0.0))

    # -- helpers ----------------------------------------------------------------------------------
    def image_ids(self, like: torch.Tensor) -> torch.Tensor:
        """``[N, 3]`` packed-latent position ids (cached per device/dtype)."""
        ids = self._img_ids
        if ids is None or ids.device != like.device or ids.dtype != like.dtype:
            ids = latent_image_ids(self.latent_height, self.latent_width, device=like.device, dtype=like.dtype)
            self._img_ids = ids
        return ids

    def __repr__(self) -> str:
        return (
            f"FluxVelocityModel(image={self.height}x{self.width}, latent={self.latent_height}x{self.latent_width}, "
            f"tokens={self.seq_len}, vae={self.describe_vae()}, "
            f"guidance={self.guidance if self.transformer.config.guidance_embeds else None}, "
            f"checkpointing={self.gradient_checkpointing})"
        )

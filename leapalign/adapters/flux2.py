"""Adapter: a diffusers ``Flux2Transformer2DModel`` (+ ``AutoencoderKLFlux2``) as a :class:`VelocityModel`.

Two pipelines drive FLUX.2 and the adapter reproduces each one's sampling bit for bit:

- ``Flux2Pipeline`` (FLUX.2-dev): **embedded** guidance -- a per-sample ``guidance`` tensor, one
  forward per step (like FLUX.1-dev).
- ``Flux2KleinPipeline`` (klein base): true **classifier-free guidance**,
  ``v = v_u + g (v_c - v_u)`` with the empty prompt as the negative. The guided velocity is the one
  the method leaps with, so unconditional and conditional run as ONE batched forward at every step,
  grad-enabled steps included. ``is_distilled=True`` (klein step-distilled) or ``g <= 1``: no CFG.

What else the adapter owns, so objectives never see FLUX.2 specifics:

- latents: noise drawn as ``[B, 4c, h/2, w/2]`` (the VAE's ``c`` latent channels already 2x2
  patchified; ``h = 2 (H // 2f)`` for VAE factor ``f``) and packed to tokens ``[B, (h/2)(w/2), 4c]``
  by the pipeline's own reshape + permute. 4-axis position ids ``(t, h, w, l)``: ``(0, i, j, 0)`` for
  image tokens, ``(0, 0, 0, l)`` for text tokens.
- the schedule: ``linspace(1, 1/T, T)`` shifted by the scheduler config with FLUX.2's empirical
  ``mu(seq_len, T)`` (:class:`~leapalign.adapters.schedules.FlowMatchSchedule`, the scheduler's
  exact float32 values); ``timestep = float32(sigma) * 1000 / 1000`` as the pipeline passes it.
- decode: unpack -> ``z * sqrt(bn.running_var + eps) + bn.running_mean`` -> 2x2 unpatchify ->
  ``vae.decode`` -> ``(x * 0.5 + 0.5).clamp(0, 1)``. Without a VAE the unpacked, unpatchified
  latents are the image (``c`` channels at latent resolution, no clamp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from leapalign.adapters.base import BatchedConditioning, TransformerVelocityModel, per_sample_timestep, require_class
from leapalign.adapters.prompt_cache import PromptEmbeddingCache
from leapalign.adapters.schedules import FlowMatchSchedule

__all__ = ["Flux2Conditioning", "Flux2VelocityModel", "flux2_empirical_mu", "FLUX2_PIPELINES", "DEFAULT_TEXT_LAYERS",
           "check_text_layout"]

FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")
DEFAULT_TEXT_LAYERS = {"Flux2Pipeline": (10, 20, 30), "Flux2KleinPipeline": (9, 18, 27)}
# FLUX.2-dev's scheduler config (also the default when no scheduler is given)
_FLUX2_SCHEDULE = FlowMatchSchedule(shift=3.0, use_dynamic_shifting=True)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift ``mu``, fitted over sequence length and step count (diffusers' ``compute_empirical_mu``)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


@dataclass
class Flux2Conditioning(BatchedConditioning):
    """Text conditioning for one micro-batch of FLUX.2.

    ``prompt_embeds [B, L, D]`` (stacked text-encoder hidden states); ``negative_prompt_embeds``
    ``[B, L, D]`` for classifier-free guidance (klein; the same ``L``: both halves run in one
    forward, as the pipeline pads both to ``max_sequence_length``); ``text_ids [L, 4]`` default to
    the pipeline's ``(0, 0, 0, l)``.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.check_embeds(self.prompt_embeds)
        neg = self.negative_prompt_embeds
        if neg is not None and neg.shape != self.prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds must have prompt_embeds' shape {tuple(self.prompt_embeds.shape)} [B, L, D], "
                f"got {tuple(neg.shape)}: classifier-free guidance runs both in one batched forward"
            )
        self.text_ids = self.shared_ids(self.text_ids, self.prompt_embeds.shape[1], 4)


class Flux2VelocityModel(TransformerVelocityModel):
    """``v(x, sigma | cond)`` for a diffusers ``Flux2Transformer2DModel`` over packed latents ``[B, N, C]``.

    Args:
        transformer: the ``Flux2Transformer2DModel`` (its ``requires_grad`` flags decide what trains).
        vae: an ``AutoencoderKLFlux2`` or ``None`` (latents are pixels; see the module docstring).
        height, width: image size in pixels, multiples of ``2 f`` (VAE scale factor ``f``).
        guidance: the pipeline's ``guidance_scale``: embedded (``cfg=False``, used when the
            transformer has guidance embeddings) or the CFG scale (``cfg=True``, CFG when > 1).
        cfg: classifier-free guidance (klein base) instead of embedded guidance (dev).
        schedule: the scheduler's schedule config (default FLUX.2's: dynamic exponential shift).
        gradient_checkpointing: recompute each transformer block in backward on grad-enabled calls.
        clamp_images: clamp decoded VAE images to [0, 1] like the pipeline.
    """

    conditioning = Flux2Conditioning
    conditioning_name = "a Flux2Conditioning"

    def __init__(
        self, transformer: torch.nn.Module, vae: torch.nn.Module | None = None, height: int = 1024, width: int = 1024,
        guidance: float = 4.0, cfg: bool = False, schedule: FlowMatchSchedule | None = None,
        gradient_checkpointing: bool = False, gradient_checkpointing_func: Callable[..., Any] | None = None,
        clamp_images: bool = True,
    ) -> None:
        require_class("transformer", transformer, "Flux2Transformer2DModel")
        cfg_t = transformer.config
        if cfg_t.patch_size != 1:
            raise ValueError(
                f"Flux2Transformer2DModel with patch_size={cfg_t.patch_size} is not supported; the FLUX.2 pipelines "
                "pack 2x2-patchified VAE latents for patch_size=1"
            )
        if cfg_t.in_channels % 4 or (cfg_t.out_channels or cfg_t.in_channels) != cfg_t.in_channels:
            raise ValueError(
                f"Flux2Transformer2DModel with in_channels={cfg_t.in_channels}, out_channels={cfg_t.out_channels} is "
                "not supported; expected in_channels = 4 x VAE latent channels and out_channels = in_channels"
            )
        self.guidance = float(guidance)
        self.cfg = bool(cfg)
        self.schedule = schedule if schedule is not None else _FLUX2_SCHEDULE
        self.clamp_images = clamp_images
        self.channels = cfg_t.in_channels
        if vae is not None:
            vcfg = vae.config
            if vcfg.latent_channels * 4 != self.channels or tuple(getattr(vcfg, "patch_size", (2, 2))) != (2, 2):
                raise ValueError(
                    f"VAE with latent_channels={vcfg.latent_channels}, patch_size={tuple(vcfg.patch_size)} does not "
                    f"fit a transformer with in_channels={self.channels}; expected 2x2 patches of in_channels/4 channels"
                )
            if not hasattr(vae, "bn"):
                raise ValueError(f"vae must be an AutoencoderKLFlux2 (latents are batch-normalised), got {type(vae).__name__}")
        self.vae_scale_factor = self.vae_scale_factor_of(vae)
        multiple = 2 * self.vae_scale_factor
        self._setup(transformer, vae, height, width, multiple, "2 x vae scale factor",
                    gradient_checkpointing, gradient_checkpointing_func)
        self.latent_height = 2 * (self.height // multiple)  # VAE latents, before 2x2 patchifying
        self.latent_width = 2 * (self.width // multiple)
        self.seq_len = (self.latent_height // 2) * (self.latent_width // 2)
        self._ids: dict[Any, torch.Tensor] = {}
        self.prompt_cache: PromptEmbeddingCache | None = None
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pipeline(
        cls, pipe: Any, height: int = 1024, width: int = 1024, guidance: float = 4.0, max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] | None = None, **kwargs: Any,
    ) -> "Flux2VelocityModel":
        """Wrap a ``Flux2Pipeline`` or ``Flux2KleinPipeline``: transformer, VAE, schedule and text path.

        ``encode_prompts`` then runs the pipeline's own ``encode_prompt`` (cached per prompt) with
        ``max_sequence_length`` and ``text_encoder_out_layers`` (default: the pipeline's). For klein
        base the empty negative prompt is encoded here, once, so CFG still works after
        ``release_text_encoders()``. A text encoder whose stacked hidden states cannot feed the
        transformer is refused here, not at the first forward.
        """
        family = cls.pipeline_class(pipe, FLUX2_PIPELINES, "a FLUX.2")
        layers = tuple(text_encoder_out_layers) if text_encoder_out_layers is not None else DEFAULT_TEXT_LAYERS[family]
        klein = family == "Flux2KleinPipeline"
        distilled = bool(getattr(pipe.config, "is_distilled", False)) if klein else False
        kwargs.setdefault("schedule", FlowMatchSchedule.from_scheduler(pipe.scheduler))
        model = cls(pipe.transformer, vae=getattr(pipe, "vae", None), height=height, width=width, guidance=guidance,
                    cfg=klein and not distilled, **kwargs)
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is not None:
            check_text_layout(encoder.config, layers, pipe.transformer.config.joint_attention_dim, family,
                              type(encoder).__name__)

            def encode(prompts: list[str]) -> tuple[torch.Tensor, ...]:
                embeds, _ = pipe.encode_prompt(
                    prompt=prompts, device=next(encoder.parameters()).device, num_images_per_prompt=1,
                    max_sequence_length=max_sequence_length, text_encoder_out_layers=layers,
                )
                return (embeds,)

            model.prompt_cache = PromptEmbeddingCache(encode, pipe, ("text_encoder", "tokenizer"))
            if model.cfg:
                model._negative = model.prompt_cache.get([""])[0][0]
        return model

    # -- VelocityModel protocol -------------------------------------------------------------------
    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance on: a CFG model (klein base) with ``guidance > 1`` (the pipeline's rule)."""
        return self.cfg and self.guidance > 1

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """``[B, 4c, h/2, w/2]``, as ``Flux2Pipeline.prepare_latents`` draws its noise before packing."""
        return (batch_size, self.channels, self.latent_height // 2, self.latent_width // 2)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's default schedule for ``num_steps``: the scheduler's exact float32 sigmas, final 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        base = np.linspace(1.0, 1 / num_steps, num_steps)
        return self.schedule.sigmas(num_steps, base=base, mu=flux2_empirical_mu(self.seq_len, num_steps))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Flux2Conditioning) -> torch.Tensor:
        batch = self.check_inputs(x, cond)
        timestep = per_sample_timestep(FlowMatchSchedule.timesteps(torch.as_tensor(sigma, device=x.device)), batch)
        timestep = timestep.to(x.dtype) / 1000
        txt_ids = cond.text_ids if cond.text_ids is not None else self._text_ids(cond.prompt_embeds.shape[1], x.device)
        kwargs = dict(img_ids=self._image_ids(x.device), txt_ids=txt_ids.to(x.device), return_dict=False)
        if self.do_cfg:
            self.require_negatives(cond.negative_prompt_embeds is not None, "cond.negative_prompt_embeds")
            out = self.guided(self.transformer(
                hidden_states=torch.cat([x, x]),
                encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
                timestep=torch.cat([timestep, timestep]),
                guidance=None,
                **kwargs,
            )[0])
        else:
            guidance = None
            if not self.cfg and self.transformer.config.guidance_embeds:
                guidance = torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(batch)
            out = self.transformer(
                hidden_states=x, encoder_hidden_states=cond.prompt_embeds, timestep=timestep, guidance=guidance, **kwargs
            )[0]
        # under autocast the network answers in bf16; the rollout state keeps its own dtype
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.unpack(latents)
        if self.vae is None:
            return _unpatchify(z)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
        return self.vae_images(_unpatchify(z * std + mean))

    # -- prompts ----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Flux2Conditioning:
        """The pipeline's ``encode_prompt`` for ``prompts`` (cached per prompt), negatives when CFG is on."""
        (embeds,) = self.cached_prompts(prompts, "a pipeline text_encoder")
        negative = None
        if self.cfg and self._negative is not None:
            negative = self._negative.to(self.device, self.dtype).expand_as(embeds)
        return Flux2Conditioning(embeds, negative)

    # -- packing and ids --------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w] -> [B, h w, C]`` by the pipeline's reshape + permute (a view, same strides)."""
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``[B, N, C] -> [B, C, h/2, w/2]`` (latent sizes after patchifying)."""
        b, n, c = packed.shape
        h, w = self.latent_height // 2, self.latent_width // 2
        if n != h * w:
            raise ValueError(f"packed latents have {n} tokens, expected {h * w} ({h}x{w})")
        return packed.permute(0, 2, 1).reshape(b, c, h, w)

    def _image_ids(self, device: torch.device) -> torch.Tensor:
        key = ("img", device)
        if key not in self._ids:
            h, w = self.latent_height // 2, self.latent_width // 2
            one = torch.arange(1)
            self._ids[key] = torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one).to(device)
        return self._ids[key]

    def _text_ids(self, length: int, device: torch.device) -> torch.Tensor:
        key = ("txt", length, device)
        if key not in self._ids:
            one = torch.arange(1)
            self._ids[key] = torch.cartesian_prod(one, one, one, torch.arange(length)).to(device)
        return self._ids[key]

    def __repr__(self) -> str:
        mode = "cfg" if self.do_cfg else ("embedded" if self.transformer.config.guidance_embeds and not self.cfg else "none")
        return (
            f"Flux2VelocityModel(image={self.height}x{self.width}, tokens={self.seq_len}, channels={self.channels}, "
            f"guidance={self.guidance} ({mode}), vae={self.describe_vae()}, "
            f"checkpointing={self.gradient_checkpointing})"
        )


def _unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 4c, h, w] -> [B, c, 2h, 2w]``, as ``Flux2Pipeline._unpatchify_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def check_text_layout(config: Any, layers: Sequence[int], joint_dim: int, family: str, name: str | None = None) -> None:
    """The text encoder's stacked hidden states ``len(layers) x hidden_size`` must be the transformer's
    input width (``config``: the encoder's transformers config; multimodal ones nest it as ``text_config``).
    Raises ``ValueError`` naming the encoder (``name``, else the config's architecture), what it gives
    and what the supported layouts are."""
    layers = tuple(layers)
    cfg = getattr(config, "text_config", None) or config
    hidden = getattr(cfg, "hidden_size", None)
    depth = getattr(cfg, "num_hidden_layers", None)
    name = name or (getattr(config, "architectures", None) or [type(config).__name__])[0]
    supported = (
        "supported: joint_attention_dim = len(text_encoder_out_layers) x hidden_size, every layer index "
        "<= num_hidden_layers (FLUX.2-dev: Mistral-3, layers (10, 20, 30); klein: Qwen3, layers (9, 18, 27))"
    )
    if hidden is None or depth is None:
        raise ValueError(f"{family} text encoder {name} has no hidden_size/num_hidden_layers in its config; {supported}")
    out_of_range = [i for i in layers if not -(depth + 1) <= i <= depth]
    if not layers or out_of_range:
        raise ValueError(
            f"{family} text encoder {name} has {depth} hidden layers but text_encoder_out_layers={layers} "
            f"(out of range: {out_of_range}); {supported}"
        )
    if len(layers) * hidden != joint_dim:
        raise ValueError(
            f"{family} text encoder {name} (hidden_size={hidden}) stacking text_encoder_out_layers={layers} gives "
            f"{len(layers) * hidden}-dim prompt embeddings, but the transformer's joint_attention_dim is {joint_dim}; "
            f"{supported}"
        )

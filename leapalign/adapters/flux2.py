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

from leapalign.adapters.flux import checkpoint_block
from leapalign.adapters.prompt_cache import PromptEmbeddingCache
from leapalign.adapters.schedules import FlowMatchSchedule

__all__ = ["Flux2Conditioning", "Flux2VelocityModel", "flux2_empirical_mu", "FLUX2_PIPELINES"]

FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")
_DEFAULT_TEXT_LAYERS = {"Flux2Pipeline": (10, 20, 30), "Flux2KleinPipeline": (9, 18, 27)}
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
class Flux2Conditioning:
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
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(self.prompt_embeds.shape)}")
        neg = self.negative_prompt_embeds
        if neg is not None and neg.shape != self.prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds must have prompt_embeds' shape {tuple(self.prompt_embeds.shape)} [B, L, D], "
                f"got {tuple(neg.shape)}: classifier-free guidance runs both in one batched forward"
            )
        if self.text_ids is not None:
            if self.text_ids.ndim == 3:  # the pipeline's batched form: ids are shared
                self.text_ids = self.text_ids[0]
            expected = (self.prompt_embeds.shape[1], 4)
            if tuple(self.text_ids.shape) != expected:
                raise ValueError(f"text_ids must have shape {expected} ([L, 4]), got {tuple(self.text_ids.shape)}")

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Flux2Conditioning":
        neg = self.negative_prompt_embeds
        return Flux2Conditioning(
            self.prompt_embeds.to(device, dtype),
            neg.to(device, dtype) if neg is not None else None,
            self.text_ids.to(device=device) if self.text_ids is not None else None,
        )

    def select(self, index: slice | torch.Tensor | list[int]) -> "Flux2Conditioning":
        """Rows ``index`` of the batch (micro-batching)."""
        neg = self.negative_prompt_embeds
        return Flux2Conditioning(self.prompt_embeds[index], neg[index] if neg is not None else None, self.text_ids)


def _pipeline_family(pipe: Any) -> str | None:
    names = [cls.__name__ for cls in type(pipe).__mro__]
    return next((n for n in FLUX2_PIPELINES if n in names), None)


class Flux2VelocityModel:
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

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module | None = None,
        height: int = 1024,
        width: int = 1024,
        guidance: float = 4.0,
        cfg: bool = False,
        schedule: FlowMatchSchedule | None = None,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_func: Callable[..., Any] | None = None,
        clamp_images: bool = True,
    ) -> None:
        found = type(transformer).__name__
        if "Flux2Transformer2DModel" not in (c.__name__ for c in type(transformer).__mro__):  # subclasses (FSDP2's) are fine
            raise ValueError(f"transformer must be a Flux2Transformer2DModel, got {found}")
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
        self.transformer = transformer
        self.vae = vae
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
            self.vae_scale_factor = 2 ** (len(vcfg.block_out_channels) - 1)
        else:
            self.vae_scale_factor = 1
        multiple = 2 * self.vae_scale_factor
        for arg, size in (("height", height), ("width", width)):
            if size <= 0 or size % multiple:
                raise ValueError(f"{arg} must be a positive multiple of {multiple} (2 x vae scale factor), got {size}")
        self.height, self.width = int(height), int(width)
        self.latent_height = 2 * (self.height // multiple)  # VAE latents, before 2x2 patchifying
        self.latent_width = 2 * (self.width // multiple)
        self.seq_len = (self.latent_height // 2) * (self.latent_width // 2)

        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func or checkpoint_block)
        self._ids: dict[Any, torch.Tensor] = {}
        self.prompt_cache: PromptEmbeddingCache | None = None
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        height: int = 1024,
        width: int = 1024,
        guidance: float = 4.0,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> "Flux2VelocityModel":
        """Wrap a ``Flux2Pipeline`` or ``Flux2KleinPipeline``: transformer, VAE, schedule and text path.

        ``encode_prompts`` then runs the pipeline's own ``encode_prompt`` (cached per prompt) with
        ``max_sequence_length`` and ``text_encoder_out_layers`` (default: the pipeline's). For klein
        base the empty negative prompt is encoded here, once, so CFG still works after
        ``release_text_encoders()``. A text encoder whose stacked hidden states cannot feed the
        transformer is refused here, not at the first forward.
        """
        family = _pipeline_family(pipe)
        if family is None:
            raise ValueError(f"{type(pipe).__name__} is not a FLUX.2 pipeline; Flux2VelocityModel supports {FLUX2_PIPELINES}")
        layers = tuple(text_encoder_out_layers) if text_encoder_out_layers is not None else _DEFAULT_TEXT_LAYERS[family]
        klein = family == "Flux2KleinPipeline"
        distilled = bool(getattr(pipe.config, "is_distilled", False)) if klein else False
        kwargs.setdefault("schedule", FlowMatchSchedule.from_scheduler(pipe.scheduler))
        model = cls(pipe.transformer, vae=getattr(pipe, "vae", None), height=height, width=width, guidance=guidance,
                    cfg=klein and not distilled, **kwargs)
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is not None:
            _check_text_layout(encoder, layers, pipe.transformer.config.joint_attention_dim, family)

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
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance on: a CFG model (klein base) with ``guidance > 1`` (the pipeline's rule)."""
        return self.cfg and self.guidance > 1

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal ``[B, 4c, h/2, w/2]`` packed to tokens, as ``Flux2Pipeline.prepare_latents``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, self.channels, self.latent_height // 2, self.latent_width // 2)
        gen_device = generator.device if generator is not None else self.device
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=self.dtype).to(self.device)
        return self.pack(latents)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's default schedule for ``num_steps``: the scheduler's exact float32 sigmas, final 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        base = np.linspace(1.0, 1 / num_steps, num_steps)
        return self.schedule.sigmas(num_steps, base=base, mu=flux2_empirical_mu(self.seq_len, num_steps))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Flux2Conditioning) -> torch.Tensor:
        if not isinstance(cond, Flux2Conditioning):
            raise TypeError(f"cond must be a Flux2Conditioning, got {type(cond).__name__}")
        if x.ndim != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.channels:
            raise ValueError(f"x must be packed latents [B, {self.seq_len}, {self.channels}], got {tuple(x.shape)}")
        batch = x.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"cond has batch size {cond.batch_size} but x has batch size {batch}; they must match")
        timestep = _scheduler_timestep(sigma, batch, x.device).to(x.dtype) / 1000
        txt_ids = cond.text_ids if cond.text_ids is not None else self._text_ids(cond.prompt_embeds.shape[1], x.device)
        kwargs = dict(img_ids=self._image_ids(x.device), txt_ids=txt_ids.to(x.device), return_dict=False)
        if self.do_cfg:
            if cond.negative_prompt_embeds is None:
                raise ValueError(
                    f"classifier-free guidance (guidance={self.guidance}) needs cond.negative_prompt_embeds; "
                    "build the conditioning with encode_prompts() or pass negatives"
                )
            out = self.transformer(
                hidden_states=torch.cat([x, x]),
                encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
                timestep=torch.cat([timestep, timestep]),
                guidance=None,
                **kwargs,
            )[0]
            uncond, text = out.chunk(2)
            out = uncond + self.guidance * (text - uncond)
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
        z = _unpatchify(z * std + mean)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        images = images * 0.5 + 0.5
        return images.clamp(0, 1) if self.clamp_images else images

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # -- prompts ----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Flux2Conditioning:
        """The pipeline's ``encode_prompt`` for ``prompts`` (cached per prompt), negatives when CFG is on."""
        if self.prompt_cache is None:
            raise ValueError(
                "this Flux2VelocityModel has no text path (built without a pipeline text_encoder); "
                "pass a Flux2Conditioning built from prompt embeddings"
            )
        (embeds,) = self.prompt_cache.get(prompts)
        embeds = embeds.to(self.device, self.dtype)
        negative = None
        if self.cfg and self._negative is not None:
            negative = self._negative.to(self.device, self.dtype).expand_as(embeds)
        return Flux2Conditioning(embeds, negative)

    def release_text_encoders(self) -> None:
        """Drop the pipeline's text encoder and tokenizer; cached prompts stay servable."""
        if self.prompt_cache is not None:
            self.prompt_cache.release()

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
            f"guidance={self.guidance} ({mode}), vae={'yes' if self.vae is not None else 'no (latents are pixels)'}, "
            f"checkpointing={self.gradient_checkpointing})"
        )


def _scheduler_timestep(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """``[B]`` float32 ``sigma * 1000``: the scheduler's ``timesteps`` entry the pipelines hand out."""
    t = FlowMatchSchedule.timesteps(torch.as_tensor(sigma, device=device))
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or [{batch}], got shape {tuple(t.shape)}")
    return t


def _unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 4c, h, w] -> [B, c, 2h, 2w]``, as ``Flux2Pipeline._unpatchify_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def _check_text_layout(encoder: Any, layers: tuple[int, ...], joint_dim: int, family: str) -> None:
    """The stacked hidden states ``len(layers) x hidden_size`` must be the transformer's input width."""
    cfg = getattr(encoder.config, "text_config", encoder.config)
    hidden = getattr(cfg, "hidden_size", None)
    depth = getattr(cfg, "num_hidden_layers", None)
    name = type(encoder).__name__
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

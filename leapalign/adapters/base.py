"""The one protocol every model adapter satisfies, and the plumbing the diffusers adapters share.

:class:`VelocityModel` is kept small on purpose (TRL's lesson): any flow-matching transformer fits
if it can draw noise, predict a velocity, give its sigma schedule and decode latents to images.

:class:`TransformerVelocityModel` and :class:`BatchedConditioning` hold what the FLUX.1, FLUX.2
and SD3 adapters do alike (image-size checks, block checkpointing, noise, input checks, per-sample
timesteps, classifier-free guidance, VAE post-processing, the cached text path); each adapter
module keeps what makes its family itself (packing, ids, schedule, the transformer call).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.utils.checkpoint

__all__ = [
    "VelocityModel",
    "TransformerVelocityModel",
    "BatchedConditioning",
    "checkpoint_block",
    "class_names",
    "require_class",
    "per_sample_timestep",
]


@runtime_checkable
class VelocityModel(Protocol):
    """``v(x, sigma | cond)`` over packed latents ``x: [B, N, C]``.

    - ``noise(batch_size, generator)`` -> ``[B, N, C]`` standard normal, in the model's dtype/device.
    - ``velocity(x, sigma, cond)`` -> ``[B, N, C]``; ``sigma`` is a scalar or ``[B]`` tensor in [0, 1].
    - ``sigmas(num_steps)`` -> ``[T + 1]`` float64 schedule from 1 to 0 (Flux: dynamic shift from N).
    - ``decode(latents)`` -> images ``[B, 3, H, W]`` in [0, 1], differentiable (identity-like for
      pixel-space models).
    - ``trainable_parameters()`` -> what the optimiser updates (LoRA or full weights).
    ``cond`` is adapter-specific (prompt embeddings...); objectives pass it through untouched.
    """

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...


def checkpoint_block(module: Callable[..., Any], *args: Any) -> Any:
    """diffusers ``gradient_checkpointing_func``: recompute one transformer block in backward (non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def class_names(obj: Any) -> list[str]:
    """The class names along ``obj``'s MRO: subclasses (FSDP2's wrappers) still match by name."""
    return [cls.__name__ for cls in type(obj).__mro__]


def require_class(arg: str, obj: Any, name: str, article: str = "a") -> None:
    """Refuse ``obj`` unless a class named ``name`` is along its MRO (the error names ``arg`` and what came)."""
    if name not in class_names(obj):
        raise ValueError(f"{arg} must be {article} {name}, got {type(obj).__name__}")


def per_sample_timestep(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A scalar timestep expanded to ``[batch]``; a ``[batch]`` one as is; anything else refused."""
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or [{batch}], got shape {tuple(t.shape)}")
    return t


class BatchedConditioning:
    """Mixin for the conditioning dataclasses: every tensor field is ``[B, ...]`` (or None) except
    ``text_ids``, which the batch shares (moved to a device, never cast, never sliced)."""

    _SHARED = ("text_ids",)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        return self._map(lambda t: t.to(device, dtype), lambda t: t.to(device=device))

    def select(self, index: slice | torch.Tensor | list[int]) -> Any:
        """Rows ``index`` of the batch (micro-batching)."""
        return self._map(lambda t: t[index], lambda t: t)

    def _map(self, batched: Callable, shared: Callable) -> Any:
        values = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            values[f.name] = None if t is None else (shared if f.name in self._SHARED else batched)(t)
        return type(self)(**values)

    @staticmethod
    def check_embeds(prompt_embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """``prompt_embeds [B, L, D]`` and, when given, ``pooled_prompt_embeds [B, P]`` of the same batch."""
        if prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(prompt_embeds.shape)}")
        if pooled is None:
            return
        if pooled.ndim != 2:
            raise ValueError(f"pooled_prompt_embeds must be [B, P], got shape {tuple(pooled.shape)}")
        if prompt_embeds.shape[0] != pooled.shape[0]:
            raise ValueError(
                f"prompt_embeds has batch {prompt_embeds.shape[0]} but pooled_prompt_embeds has batch "
                f"{pooled.shape[0]}; they must match"
            )

    @staticmethod
    def shared_ids(text_ids: torch.Tensor | None, length: int, axes: int) -> torch.Tensor | None:
        """``text_ids [L, axes]``; the pipelines' batched ``[B, L, axes]`` form gives its first row (ids are shared)."""
        if text_ids is None:
            return None
        if text_ids.ndim == 3:
            text_ids = text_ids[0]
        if tuple(text_ids.shape) != (length, axes):
            raise ValueError(f"text_ids must have shape {(length, axes)} ([L, {axes}]), got {tuple(text_ids.shape)}")
        return text_ids


class TransformerVelocityModel:
    """What the diffusers-transformer adapters share; a subclass sets the attributes below and
    writes ``sigmas``, ``velocity``, ``decode``, ``latent_shape`` and ``pack``.

    Class attributes: ``conditioning`` (the family's conditioning class, with its article for
    errors in ``conditioning_name``) and ``token_name`` (what the protocol's ``[B, N, C]`` holds).
    Instance attributes set by :meth:`_setup`: ``transformer``, ``vae``, ``height``, ``width``,
    ``gradient_checkpointing``, ``prompt_cache``; by the subclass: ``seq_len``, ``channels``, ``guidance``.
    """

    conditioning: type
    conditioning_name: str
    token_name = "packed latents"
    prompt_cache: Any = None

    def _setup(
        self, transformer: torch.nn.Module, vae: torch.nn.Module | None, height: int, width: int,
        multiple: int, why: str, gradient_checkpointing: bool, gradient_checkpointing_func: Callable | None,
    ) -> None:
        """Keep the modules, check the image size is a positive multiple of ``multiple`` (``why``), and
        turn on per-block checkpointing (diffusers checkpoints only when autograd is on)."""
        self.transformer, self.vae = transformer, vae
        for arg, size in (("height", height), ("width", width)):
            if size <= 0 or size % multiple:
                raise ValueError(f"{arg} must be a positive multiple of {multiple} ({why}), got {size}")
        self.height, self.width = int(height), int(width)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing(
                gradient_checkpointing_func=gradient_checkpointing_func or checkpoint_block
            )

    @classmethod
    def pipeline_class(cls, pipe: Any, supported: tuple[str, ...], family: str) -> str:
        """The first of ``supported`` along ``pipe``'s MRO; an error naming ``family`` and the supported ones otherwise."""
        names = class_names(pipe)
        found = next((name for name in supported if name in names), None)
        if found is None:
            raise ValueError(f"{type(pipe).__name__} is not {family} pipeline; {cls.__name__} supports {supported}")
        return found

    @staticmethod
    def vae_scale_factor_of(vae: torch.nn.Module | None) -> int:
        """``2 ** (len(block_out_channels) - 1)`` of a diffusers VAE; 1 without one (latents are pixels)."""
        return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal latents of the pipeline's ``prepare_latents`` shape (:meth:`latent_shape`),
        drawn on the generator's device, then packed to tokens."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen_device = generator.device if generator is not None else self.device
        latents = torch.randn(self.latent_shape(batch_size), generator=generator, device=gen_device, dtype=self.dtype)
        return self.pack(latents.to(self.device))

    def check_inputs(self, x: torch.Tensor, cond: Any) -> int:
        """The batch size of a ``velocity`` call, after checking ``cond``'s class, ``x``'s shape and both batches."""
        if not isinstance(cond, self.conditioning):
            raise TypeError(f"cond must be {self.conditioning_name}, got {type(cond).__name__}")
        if x.ndim != 3 or x.shape[1] != self.seq_len or x.shape[2] != self.channels:
            raise ValueError(f"x must be {self.token_name} [B, {self.seq_len}, {self.channels}], got {tuple(x.shape)}")
        batch = x.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"cond has batch size {cond.batch_size} but x has batch size {batch}; they must match")
        return batch

    def guided(self, out: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of a batched ``[uncond; cond]`` output: ``v_u + g (v_c - v_u)``."""
        uncond, text = out.chunk(2)
        return uncond + self.guidance * (text - uncond)

    def require_negatives(self, present: bool, what: str) -> None:
        """Refuse a CFG call whose conditioning lacks the negative embeddings (``what`` names them)."""
        if not present:
            raise ValueError(
                f"classifier-free guidance (guidance={self.guidance}) needs {what}; "
                "build the conditioning with encode_prompts() or pass negatives"
            )

    def vae_images(self, z: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z)`` mapped from [-1, 1] to [0, 1] (clamped unless ``clamp_images`` is off), as the pipelines."""
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        images = images * 0.5 + 0.5
        return images.clamp(0, 1) if self.clamp_images else images

    def cached_prompts(self, prompts: Sequence[str], without: str) -> tuple[torch.Tensor, ...]:
        """The pipeline's prompt embeddings for ``prompts`` from the cache, on the model's device and dtype."""
        if self.prompt_cache is None:
            raise ValueError(
                f"this {type(self).__name__} has no text path (built without {without}); "
                f"pass {self.conditioning_name} built from prompt embeddings"
            )
        return tuple(t.to(self.device, self.dtype) for t in self.prompt_cache.get(prompts))

    def release_text_encoders(self) -> None:
        """Drop the pipeline's text encoders and tokenizers; cached prompts stay servable."""
        if self.prompt_cache is not None:
            self.prompt_cache.release()

    def describe_vae(self) -> str:
        return "yes" if self.vae is not None else "no (latents are pixels)"

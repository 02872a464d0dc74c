"""Tiny Flux-architecture text-to-image model of the shapes world, behind the VelocityModel protocol.

The image model is diffusers' own ``FluxTransformer2DModel`` (a few million parameters, no
guidance embedding) working in *pixel space*: a ``[3, 32, 32]`` image in [-1, 1] is
space-to-depth'ed 2x2 (``pixel_unshuffle``: the "latent" is ``[12, 16, 16]``) and then packed in
2x2 patches exactly as Flux packs VAE latents (:func:`leapalign.flow.pack_latents`), giving 64 tokens
of 48 channels. Compared with packing the raw pixels (256 tokens of 12 channels) this is ~10x
cheaper per training step on 2 CPU cores (one AdamW step at batch 64 measured 0.7 s with 64 tokens
and 2+4 blocks vs 9.3 s with 256 tokens and only 2+2 blocks), which is what makes CPU pretraining
and a minutes-long LeapAlign demo possible.

Sigmas: :func:`leapalign.flow.flux_sigmas` with Flux's dynamic shift at the model's sequence length
(64 tokens -> mu ~ 0.47, a mild shift of ~1.6x towards noise). It is the same code path the Flux
adapter uses, so objectives see no model-specific schedule, and a mild shift suits a low-resolution
pixel-space model (SD3's resolution-dependent shift argument).

Decode: unpack -> pixel_shuffle -> ``((x + 1) / 2).clamp(0, 1)``, diffusers' own postprocessing;
differentiable (almost everywhere), and exactly the inverse of :meth:`ShapesVelocityModel.encode_images`
for images in [0, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import nn

from leapalign.flow import flux_sigmas, latent_image_ids, pack_latents, text_ids, unpack_latents
from leapalign.shapes.assets import ASSETS_DIR, checkpoint_files, load_checkpoint, save_checkpoint
from leapalign.shapes.text import ShapesTextEncoder, ShapesTokenizer, TextEncoderConfig
from leapalign.shapes.world import IMAGE_SIZE

__all__ = [
    "ASSETS_DIR", "DEFAULT_MODEL_NAME", "ShapesModelConfig", "ShapesConditioning", "ShapesVelocityModel",
    "build_shapes_model", "load_shapes_model", "save_shapes_model", "shapes_model_files",
]

DEFAULT_MODEL_NAME = "shapes_flux"
_MODEL_FILES = ("shapes model", "build it with `python -m leapalign.shapes.pretrain --out DIR`")  # what a missing file is, how to make it


@dataclass
class ShapesModelConfig:
    """Everything needed to rebuild the model: image geometry, Flux and text-encoder sizes."""

    image_size: int = IMAGE_SIZE
    unshuffle: int = 2  # space-to-depth factor before Flux's 2x2 packing
    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}")
        if self.image_size % (2 * self.unshuffle):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2 * unshuffle = {2 * self.unshuffle}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.unshuffle

    @property
    def latent_channels(self) -> int:
        return 3 * self.unshuffle**2

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    @property
    def token_channels(self) -> int:
        return 4 * self.latent_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


@dataclass
class ShapesConditioning:
    """What ``velocity`` needs per batch: the text encoder's outputs, and the prompts they came from."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_prompt_embeds: torch.Tensor  # [B, P]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


class ShapesVelocityModel(nn.Module):
    """``v(x, sigma | prompt)`` over packed pixel latents ``[B, 64, 48]``; satisfies ``VelocityModel``.

    ``train_text_encoder`` decides whether :meth:`trainable_parameters` includes the text encoder
    (pretraining: yes; alignment: no by default, as with Flux's frozen T5/CLIP).
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        text_encoder: ShapesTextEncoder,
        config: ShapesModelConfig,
        train_text_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.config = config
        self.tokenizer = ShapesTokenizer(config.text.max_length)
        self.train_text_encoder = train_text_encoder
        half = config.latent_size // 2
        self.register_buffer("img_ids", latent_image_ids(config.latent_size, config.latent_size), persistent=False)
        self.register_buffer("txt_ids", text_ids(config.text.max_length), persistent=False)
        assert self.img_ids.shape[0] == half * half

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    # --- text -------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> ShapesConditioning:
        """Tokenize and encode ``prompts``; gradients flow only if the text encoder is trainable."""
        ids = self.tokenizer.encode(list(prompts)).to(self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            hidden, pooled = self.text_encoder(ids)
        return ShapesConditioning(hidden.to(self.dtype), pooled.to(self.dtype), list(prompts))

    # --- VelocityModel protocol -------------------------------------------------------------------
    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (batch_size, self.config.num_tokens, self.config.token_channels)
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device, self.dtype)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        if not isinstance(cond, ShapesConditioning):
            raise TypeError(f"cond must be a ShapesConditioning (from encode_prompts), got {type(cond).__name__}")
        expected = (self.config.num_tokens, self.config.token_channels)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {expected[0]}, {expected[1]}], got shape {tuple(x.shape)}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"cond holds {len(cond)} prompts but x has batch {x.shape[0]}")
        timestep = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        timestep = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep.reshape(x.shape[0])
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=timestep,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return flux_sigmas(num_steps, seq_len=self.config.num_tokens)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = unpack_latents(latents, self.config.latent_size, self.config.latent_size)
        x = F.pixel_shuffle(x, self.config.unshuffle)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.transformer.parameters())
        if self.train_text_encoder:
            params += list(self.text_encoder.parameters())
        return params

    # --- helpers used by pretraining, the scorer and the demo ---------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> packed latents ``[B, N, C]`` (inverse of :meth:`decode`)."""
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}], got shape {tuple(images.shape)}")
        x = F.pixel_unshuffle(images.to(self.device, self.dtype) * 2.0 - 1.0, self.config.unshuffle)
        return pack_latents(x)

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], num_steps: int = 16, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Euler ODE sampling from noise over :meth:`sigmas`; images ``[B, 3, H, W]`` in [0, 1]."""
        cond = self.encode_prompts(prompts)
        x = self.noise(len(prompts), generator)
        sig = self.sigmas(num_steps).to(x.device)
        for i in range(num_steps):
            v = self.velocity(x, sig[i].to(x.dtype), cond)
            x = x + (sig[i + 1] - sig[i]).to(x.dtype) * v
        return self.decode(x)


def build_shapes_model(config: ShapesModelConfig | None = None, seed: int = 0, train_text_encoder: bool = False) -> ShapesVelocityModel:
    """A freshly initialised model (deterministic from ``seed``)."""
    config = config or ShapesModelConfig()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.token_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text.dim,
        pooled_projection_dim=config.text.pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=config.axes_dims_rope,
    )
    return ShapesVelocityModel(transformer, ShapesTextEncoder(config.text), config, train_text_encoder)


def save_shapes_model(model: ShapesVelocityModel, out_dir: str | Path, name: str = DEFAULT_MODEL_NAME, meta: dict | None = None) -> Path:
    """Write ``{name}.safetensors`` (fp32 weights) and ``{name}.json`` (config + ``meta``); returns the weights path."""
    tensors = {f"transformer.{k}": v for k, v in model.transformer.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()}
    return save_checkpoint(tensors, model.config.to_dict(), out_dir, name, meta)


def shapes_model_files(path: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights, json)`` of the model at ``path`` (file or directory; ``None``: the shipped one), both present."""
    return checkpoint_files(path, DEFAULT_MODEL_NAME, *_MODEL_FILES)


def load_shapes_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    train_text_encoder: bool = False,
) -> ShapesVelocityModel:
    """Load the shipped checkpoint (``leapalign/assets/shapes_flux.*``) or one at ``path``.

    ``path`` may be the ``.safetensors`` file, its ``.json`` or the directory holding
    ``shapes_flux.safetensors``. The text encoder is frozen unless ``train_text_encoder``.
    """
    state, saved = load_checkpoint(path, DEFAULT_MODEL_NAME, *_MODEL_FILES)
    model = build_shapes_model(ShapesModelConfig(**saved["config"]), train_text_encoder=train_text_encoder)
    for prefix, module in (("transformer.", model.transformer), ("text_encoder.", model.text_encoder)):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    model.text_encoder.requires_grad_(train_text_encoder)
    return model.to(device=device, dtype=dtype).eval()

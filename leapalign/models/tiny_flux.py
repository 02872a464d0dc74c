"""Flux models built from configs in code: the ONE table of named Flux configs tests and benchmarks use.

No weights are downloaded (DESIGN §5): every model here is a diffusers ``FluxTransformer2DModel``
(and optionally an ``AutoencoderKL``) with random weights drawn from a fixed seed, so two calls with
the same ``(name, dtype, seed)`` give bit-identical models.

Named configs (:data:`FLUX_SPECS`):

- ``"test"``: diffusers' own tiny Flux test config (1 double + 1 single block, 2 heads x 16 dims,
  4 input channels, rope axes (4, 4, 8)) with guidance embeddings on (as FLUX.1-dev). Its VAE is
  diffusers' tiny test VAE (1 latent channel, no down-sampling), so images are 3-channel at the
  latent resolution. Use it for correctness tests: a forward costs a few milliseconds.
- ``"cpu-bench"``: the Flux architecture at a few million parameters (2 double + 4 single blocks,
  4 heads x 32 dims, 64 input channels = 16 latent channels packed 2x2, like FLUX.1) and a
  default image of 256 packed tokens (32x32 latent). Use it for CPU memory/throughput benchmarks.
- ``"cpu-wide"``: cpu-bench's blocks at twice the width (4 heads x 64), 1,024 image tokens: the
  model of the activations benchmark (bytes saved by one forward, patched vs eager).
- ``"flux-dev"``: FLUX.1-dev's published ``transformer/config.json`` and ``vae/config.json`` (19
  double + 38 single blocks, 24 heads x 128, T5-XXL 4096 / CLIP-L 768 text dims, rope (16, 56, 56);
  16-channel VAE with 8x down-sampling), 512x512 images, 512 T5 tokens. It has 11.9 B parameters:
  the builders here refuse it (``full_size``); ``benchmarks/flux_dev.py`` materialises it on a GPU,
  and it builds under ``FakeTensorMode`` or on the ``meta`` device anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "FluxSpec",
    "FLUX_SPECS",
    "tiny_flux_spec",
    "tiny_flux_transformer",
    "tiny_flux_vae",
    "tiny_flux_velocity_model",
    "random_flux_conditioning",
]


@dataclass(frozen=True)
class FluxSpec:
    """A named Flux: transformer config, optional VAE config and a default image size.

    ``height``/``width`` are *image* sizes in pixels for the model with its VAE; without a VAE the
    adapter treats latents as pixels and the image size is the latent size (``latent_height``).
    ``text_len`` is the prompt-embedding length conditioning tensors should have. ``full_size``
    marks a real-scale architecture the CPU builders here refuse.
    """

    transformer: dict[str, Any]
    vae: dict[str, Any] | None
    height: int
    width: int
    latent_height: int
    latent_width: int
    text_len: int = 8
    description: str = ""
    full_size: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _transformer(in_channels: int, blocks: tuple[int, int], heads: tuple[int, int], text_dims: tuple[int, int],
                 rope: tuple[int, int, int], guidance: bool = True) -> dict[str, Any]:
    """A ``FluxTransformer2DModel`` config: ``blocks`` = (double, single), ``heads`` = (count, dim),
    ``text_dims`` = (joint_attention_dim, pooled_projection_dim); patch size 1, as in every Flux."""
    return dict(patch_size=1, in_channels=in_channels, num_layers=blocks[0], num_single_layers=blocks[1],
                attention_head_dim=heads[1], num_attention_heads=heads[0], joint_attention_dim=text_dims[0],
                pooled_projection_dim=text_dims[1], guidance_embeds=guidance, axes_dims_rope=rope)


def _vae(channels: tuple[int, ...], latent_channels: int, groups: int, shift: float, scale: float, sample_size: int,
         layers_per_block: int = 1, **published: Any) -> dict[str, Any]:
    """An ``AutoencoderKL`` config with one encoder/decoder block per entry of ``channels``
    (each block but the last halves the resolution); no quant convs, as in Flux's VAE."""
    n = len(channels)
    return dict(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=groups,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale, **published)


FLUX_SPECS: dict[str, FluxSpec] = {
    "test": FluxSpec(
        _transformer(4, blocks=(1, 1), heads=(2, 16), text_dims=(32, 32), rope=(4, 4, 8)),
        _vae((4,), latent_channels=1, groups=1, shift=0.0609, scale=1.5035, sample_size=32),
        height=8, width=8, latent_height=8, latent_width=8, text_len=8,
        description="diffusers' tiny Flux test config (+ guidance embeddings) and its tiny VAE",
    ),
    "cpu-bench": FluxSpec(
        _transformer(64, blocks=(2, 4), heads=(4, 32), text_dims=(64, 64), rope=(8, 12, 12)),
        _vae((8, 16), latent_channels=16, groups=4, shift=0.1159, scale=0.3611, sample_size=64),
        height=64, width=64, latent_height=32, latent_width=32, text_len=16,
        description="Flux architecture, ~3M parameters, 256 image tokens, 2x-down-sampling VAE",
    ),
    "cpu-wide": FluxSpec(
        _transformer(64, blocks=(2, 4), heads=(4, 64), text_dims=(128, 64), rope=(8, 28, 28), guidance=False),
        None, height=32, width=32, latent_height=32, latent_width=32, text_len=64,
        description="cpu-bench's blocks at width 256 (4 heads x 64), 1,024 image tokens: the activations benchmark",
    ),
    "flux-dev": FluxSpec(
        _transformer(64, blocks=(19, 38), heads=(24, 128), text_dims=(4096, 768), rope=(16, 56, 56)),
        _vae((128, 256, 512, 512), latent_channels=16, groups=32, shift=0.1159, scale=0.3611, sample_size=1024,
             layers_per_block=2, act_fn="silu", force_upcast=True, mid_block_add_attention=True),
        height=512, width=512, latent_height=64, latent_width=64, text_len=512,  # 512: FLUX.1-dev's T5 max_sequence_length
        description="FLUX.1-dev's published architecture (11.9 B parameters): GPU or fake tensors only",
        full_size=True,
    ),
}


def tiny_flux_spec(name: str) -> FluxSpec:
    """Look up a named spec; the error lists the names that exist."""
    try:
        return FLUX_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown tiny Flux config name={name!r}; expected one of {sorted(FLUX_SPECS)}") from None


def _buildable_spec(name: str) -> FluxSpec:
    """:func:`tiny_flux_spec`, refusing the full-size architectures (tens of GB in fp32 on this CPU)."""
    spec = tiny_flux_spec(name)
    if spec.full_size:
        raise ValueError(f"name={name!r} is a full-size architecture ({spec.description}); build it on the meta device "
                         "and materialise it on a GPU (benchmarks/flux_dev.py), or under FakeTensorMode")
    return spec


def _seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter from a fixed seed so weights do not depend on global RNG state.

    diffusers zero-initialises nothing in Flux, but its default init depends on the global RNG; we
    re-draw under a private generator (normal, std 0.02 for matrices; small normal for vectors) so
    outputs are non-trivial and reproducible, and every parameter receives a gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.02 if p.ndim >= 2 else 0.01
            if name.endswith("norm.weight") or ".norm_q." in name or ".norm_k." in name or "norm_added" in name:
                values = 1.0 + std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                values = std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(values.to(p.dtype))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` without diffusers' warning meant for ``from_pretrained`` users.

    (None of these tiny models has modules that must stay in float32.)
    """
    from diffusers.utils import logging as diffusers_logging

    logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(diffusers_logging.ERROR)
    try:
        return module.to(dtype)
    finally:
        logger.setLevel(level)


def tiny_flux_transformer(name: str = "test", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A ``FluxTransformer2DModel`` built from the named config, weights drawn from ``seed``.

    ``overrides`` replace config entries (e.g. ``guidance_embeds=False`` for a schnell-like model).
    """
    from diffusers import FluxTransformer2DModel

    config = dict(_buildable_spec(name).transformer)
    unknown = set(overrides) - set(config) - {"out_channels"}
    if unknown:
        raise ValueError(
            f"unknown FluxTransformer2DModel config override(s) {sorted(unknown)}; known: {sorted(config)}"
        )
    config.update(overrides)
    model = FluxTransformer2DModel(**config)
    _seeded_init(model, seed)
    return _cast(model, dtype).eval()


def tiny_flux_vae(name: str = "test", dtype: torch.dtype = torch.float32, seed: int = 1):
    """The named spec's tiny ``AutoencoderKL`` (random weights from ``seed``), or ``None`` if it has none."""
    from diffusers import AutoencoderKL

    config = _buildable_spec(name).vae
    if config is None:
        return None
    vae = AutoencoderKL(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in vae.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) / fan_in**0.5).to(p.dtype))
            elif pname.endswith("weight"):  # norm scales
                p.fill_(1.0)
            else:
                p.zero_()
    vae.requires_grad_(False)
    return _cast(vae, dtype).eval()


def tiny_flux_velocity_model(
    name: str = "test",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_vae: bool = True,
    **adapter_kwargs: Any,
):
    """A ready :class:`~leapalign.adapters.flux.FluxVelocityModel` for the named spec.

    With ``with_vae=False`` the adapter decodes by unpacking latents as pixels (see its docstring)
    and the image size is the latent size.
    """
    from leapalign.adapters.flux import FluxVelocityModel

    spec = _buildable_spec(name)
    transformer = tiny_flux_transformer(name, dtype=dtype, seed=seed)
    vae = tiny_flux_vae(name, dtype=dtype, seed=seed + 1) if with_vae else None
    if vae is not None:
        height, width = spec.height, spec.width
    else:
        height, width = spec.latent_height, spec.latent_width
    return FluxVelocityModel(transformer, vae=vae, height=height, width=width, **adapter_kwargs)


def random_flux_conditioning(
    transformer,
    batch_size: int,
    text_len: int = 8,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Random prompt embeddings shaped for ``transformer`` (stand-ins for T5/CLIP outputs in tests)."""
    from leapalign.adapters.flux import FluxConditioning

    cfg = transformer.config
    dtype = dtype or transformer.dtype
    device = device if device is not None else transformer.device
    gen_device = generator.device if generator is not None else "cpu"
    prompt = torch.randn(batch_size, text_len, cfg.joint_attention_dim, generator=generator, device=gen_device)
    pooled = torch.randn(batch_size, cfg.pooled_projection_dim, generator=generator, device=gen_device)
    return FluxConditioning(prompt_embeds=prompt.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype))

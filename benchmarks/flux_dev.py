"""The FLUX.1-dev architecture with random weights, for GPU benchmarks (no download, DESIGN §5).

Config values are FLUX.1-dev's published ``transformer/config.json`` and ``vae/config.json``:
19 double + 38 single blocks, 24 heads x 128, joint_attention_dim 4096 (T5-XXL), pooled 768
(CLIP-L), guidance embeddings, rope axes (16, 56, 56); a 16-channel VAE with 8x down-sampling.
At 512x512 the image is 64x64 latents = 1024 packed tokens, plus 512 T5 tokens.

The transformer (11.9 B parameters) is built on the ``meta`` device and materialised directly on
the GPU in the target dtype: building it on CPU in fp32 would need ~48 GB of host RAM and minutes.
Weights are drawn on the device from a seeded generator (normal, std 0.02; norm scales 1), which
is all that speed and memory measurements need.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["FLUX_DEV_TRANSFORMER", "FLUX_DEV_VAE", "FLUX_DEV_TEXT_LEN", "flux_dev_velocity_model", "materialize_random"]

FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

FLUX_DEV_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)

FLUX_DEV_TEXT_LEN = 512  # FLUX.1-dev's T5 max_sequence_length


def materialize_random(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Allocate a meta-device ``module`` on ``device`` in ``dtype`` and fill it from ``seed``.

    Raises ValueError naming the buffer if the module holds buffers (they would stay uninitialised).
    """
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise ValueError(f"materialize_random cannot initialise buffers; {type(module).__name__} has {buffers[:3]}")
    module = module.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = p.ndim == 1 and ("norm" in name) and name.endswith("weight")
            if is_norm_scale:
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.01, generator=gen)
    return module


def flux_dev_velocity_model(dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda", seed: int = 0,
                            height: int = 512, width: int = 512) -> Any:
    """A :class:`~leapalign.adapters.flux.FluxVelocityModel` over a random-weight FLUX.1-dev + VAE.

    Raises ValueError if ``device`` is not a CUDA device (the model needs ~24 GB in bf16).
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from leapalign.adapters.flux import FluxVelocityModel

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the flux-dev benchmark model needs a CUDA device (~24 GB in bf16), got device={device}")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_DEV_VAE)
    transformer = materialize_random(transformer, device, dtype, seed).eval()
    vae = materialize_random(vae, device, dtype, seed + 1).eval()
    vae.requires_grad_(False)
    return FluxVelocityModel(transformer, vae=vae, height=height, width=width)

"""The FLUX.1-dev architecture with random weights, for GPU benchmarks (no download, DESIGN §5).

The config is ``leapalign.models.tiny_flux``'s ``"flux-dev"`` entry (FLUX.1-dev's published
``transformer/config.json`` and ``vae/config.json``). At 512x512 the image is 64x64 latents = 1024
packed tokens, plus 512 T5 tokens.

The transformer (11.9 B parameters) is built on the ``meta`` device and materialised directly on
the GPU in the target dtype: building it on CPU in fp32 would need ~48 GB of host RAM and minutes.
Weights are drawn on the device from a seeded generator (normal, std 0.02; norm scales 1), which
is all that speed and memory measurements need.
"""
from __future__ import annotations

from typing import Any

import torch

from leapalign.models.tiny_flux import tiny_flux_spec

__all__ = ["FLUX_DEV", "flux_dev_velocity_model", "materialize_random"]

FLUX_DEV = tiny_flux_spec("flux-dev")


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
        transformer = FluxTransformer2DModel(**FLUX_DEV.transformer)
        vae = AutoencoderKL(**FLUX_DEV.vae)
    transformer = materialize_random(transformer, device, dtype, seed).eval()
    vae = materialize_random(vae, device, dtype, seed + 1).eval()
    vae.requires_grad_(False)
    return FluxVelocityModel(transformer, vae=vae, height=height, width=width)

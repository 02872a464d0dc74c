"""Model adapters: one :class:`~leapalign.adapters.base.VelocityModel` per diffusers model family.

:func:`velocity_model_from_pipeline` picks the adapter from the pipeline's class, so callers (the
trainer, the CLI, benchmarks) never name a family. Adapter modules are imported on first use:
importing this package does not import diffusers' pipelines.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PIPELINE_FAMILIES", "pipeline_family", "velocity_model_from_pipeline"]

# pipeline class -> (family, adapter module, adapter class)
PIPELINE_FAMILIES: dict[str, tuple[str, str, str]] = {
    "FluxPipeline": ("flux", "leapalign.adapters.flux", "FluxVelocityModel"),
    "Flux2Pipeline": ("flux2", "leapalign.adapters.flux2", "Flux2VelocityModel"),
    "Flux2KleinPipeline": ("flux2", "leapalign.adapters.flux2", "Flux2VelocityModel"),
    "StableDiffusion3Pipeline": ("sd3", "leapalign.adapters.sd3", "SD3VelocityModel"),
}
_FAMILY_NAMES = {"flux": "FLUX.1", "flux2": "FLUX.2 dev / klein", "sd3": "SD3 / SD3.5"}


def _supported() -> str:
    return ", ".join(f"{cls} ({_FAMILY_NAMES[fam]})" for cls, (fam, _, _) in PIPELINE_FAMILIES.items())


def _entry(pipe: Any) -> tuple[str, str, str]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    found = type(pipe)
    raise ValueError(
        f"unsupported pipeline family: got {found.__name__} (from {found.__module__}); supported: {_supported()}"
    )


def pipeline_family(pipe: Any) -> str:
    """``"flux"``, ``"flux2"`` or ``"sd3"`` for a supported diffusers pipeline (or a subclass of one).

    Raises ``ValueError`` naming the class found and the supported ones otherwise. Related pipelines
    that are not text-to-image samplers (img2img, inpainting, KV-cached editing) are not supported.
    """
    return _entry(pipe)[0]


def velocity_model_from_pipeline(pipe: Any, **kwargs: Any):
    """The family's adapter built with its ``from_pipeline(pipe, **kwargs)``.

    Every adapter takes ``height``, ``width``, ``guidance`` (the pipeline's ``guidance_scale``:
    embedded for FLUX.1 / FLUX.2-dev, classifier-free for klein base and SD3) and
    ``gradient_checkpointing``; other keywords are the adapter's own. FLUX.2 and SD3 adapters also
    carry the pipeline's text path (``encode_prompts``); FLUX.1's is :class:`leapalign.prompts.FluxPromptEncoder`.
    """
    _, module, name = _entry(pipe)
    return getattr(importlib.import_module(module), name).from_pipeline(pipe, **kwargs)

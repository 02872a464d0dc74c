"""Model adapters: one :class:`~leapalign.adapters.base.VelocityModel` per diffusers model family.

:func:`velocity_model_from_pipeline` picks the adapter from the pipeline's class, so callers (the
trainer, the CLI, benchmarks) never name a family; :mod:`leapalign.adapters.families` says which
families exist and recognises them by pipeline class, transformer class or model folder. Adapter
modules are imported on first use: importing this package does not import diffusers' pipelines.
"""
from __future__ import annotations

from typing import Any

from leapalign.adapters.families import FAMILIES, family_of_pipeline

__all__ = ["PIPELINE_FAMILIES", "pipeline_family", "velocity_model_from_pipeline"]

# pipeline class -> (family, adapter module, adapter class)
PIPELINE_FAMILIES: dict[str, tuple[str, str, str]] = {
    pipeline: (family.name, *family.adapter.split(":")) for family in FAMILIES.values() for pipeline in family.pipelines
}


def pipeline_family(pipe: Any) -> str:
    """``"flux"``, ``"flux2"`` or ``"sd3"`` for a supported diffusers pipeline (or a subclass of one).

    Raises ``ValueError`` naming the class found and the supported ones otherwise. Related pipelines
    that are not text-to-image samplers (img2img, inpainting, KV-cached editing) are not supported.
    """
    return family_of_pipeline(pipe).name


def velocity_model_from_pipeline(pipe: Any, **kwargs: Any):
    """The family's adapter built with its ``from_pipeline(pipe, **kwargs)``.

    Every adapter takes ``height``, ``width``, ``guidance`` (the pipeline's ``guidance_scale``:
    embedded for FLUX.1 / FLUX.2-dev, classifier-free for klein base and SD3) and
    ``gradient_checkpointing``; other keywords are the adapter's own. FLUX.2 and SD3 adapters also
    carry the pipeline's text path (``encode_prompts``); FLUX.1's is :class:`leapalign.prompts.FluxPromptEncoder`.
    """
    return family_of_pipeline(pipe).adapter_class().from_pipeline(pipe, **kwargs)

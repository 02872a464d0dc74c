"""What the planner builds, from ``config.json`` files only: transformer, VAE and reward shapes.

A :class:`ModelSpec` holds the diffusers configs of the transformer and the VAE, the model family
(FLUX.1, FLUX.2, SD3: :mod:`leapalign.adapters.families`), the pipeline class and the text
conditioning length. Sources:

- a local diffusers model folder: ``transformer/config.json`` (its ``_class_name`` names the
  family), ``vae/config.json`` and ``model_index.json`` (the pipeline: FLUX.2 klein base runs
  classifier-free guidance, a step-distilled klein does not);
- ``tiny:NAME``: a config of :mod:`leapalign.models.tiny_flux` (FLUX.1) or the tiny FLUX.2 / SD3
  models of :mod:`leapalign.adapters.tiny_configs` (``tiny:flux2-klein``, ``tiny:flux2-dev``,
  ``tiny:sd3``);
- a built-in published architecture (``builtin:NAME`` or a model path whose folder name is the hub
  repository's, e.g. ``/models/FLUX.2-klein-base-4B`` when it is not on this machine):
  ``flux-dev`` (FLUX.1-dev, the default), ``flux2-klein-base-4b`` / ``flux2-klein-4b``,
  ``sd3.5-medium``. Where each number comes from is written beside it below.

Nothing here reads a weight file. Reward models of known architecture are built the same way: a
CLIP reward from its folder's ``config.json`` (PickScore_v1 is CLIP ViT-H/14 when the folder is
absent here), HPSv2.1 as CLIP ViT-H/14 shapes (open_clip's ``ViT-H-14``: the same widths, depths,
heads and patch size).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["PlanError", "ModelSpec", "FLUX_DEV", "BUILTIN", "model_spec", "clip_vit_h14_config"]


class PlanError(ValueError):
    """The planner cannot answer for this input; the message says which argument and why."""


@dataclass(frozen=True)
class ModelSpec:
    """A transformer + VAE to plan: configs, family, pipeline, prompt length and where they came from.

    ``text_len`` is the pipeline's ``max_sequence_length`` (T5 / the LLM encoder's tokens; SD3
    prepends CLIP's 77); ``distilled`` is a FLUX.2 klein pipeline's ``is_distilled`` (no CFG).
    """

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any] | None
    text_len: int = 512
    source: str = "built-in"
    notes: tuple[str, ...] = field(default_factory=tuple)
    family: str = "flux"
    pipeline: str | None = None
    distilled: bool = False


def _named(name: str, label: str | None = None) -> ModelSpec:
    """A named tiny config: FLUX.1's of :mod:`leapalign.models.tiny_flux` (``flux-dev`` is FLUX.1-dev's
    published one), or ``flux2-klein`` / ``flux2-klein-distilled`` / ``flux2-dev`` / ``sd3`` of
    :mod:`leapalign.adapters.tiny_configs` (the models the FLUX.2 and SD3 tests build)."""
    from leapalign.adapters import tiny_configs
    from leapalign.models.tiny_flux import tiny_flux_spec

    if name == "sd3" or name.startswith("flux2-"):
        family, variant = ("sd3", "") if name == "sd3" else ("flux2", name.removeprefix("flux2-"))
        try:
            transformer = tiny_configs.tiny_transformer_config(family, variant or "klein")
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        pipeline = "StableDiffusion3Pipeline" if family == "sd3" else ("Flux2Pipeline" if variant == "dev" else "Flux2KleinPipeline")
        return ModelSpec(label or name, transformer, tiny_configs.tiny_vae_config(family), 8,
                         f"leapalign.adapters.tiny_configs {name!r} config", family=family, pipeline=pipeline,
                         distilled=variant == "klein-distilled")
    try:
        spec = tiny_flux_spec(name)
    except ValueError as exc:
        raise PlanError(f"{exc}; or one of ['flux2-dev', 'flux2-klein', 'flux2-klein-distilled', 'sd3']") from None
    return ModelSpec(label or name, dict(spec.transformer), dict(spec.vae) if spec.vae else None, spec.text_len,
                     f"leapalign.models.tiny_flux {name!r} config")


FLUX_DEV = _named("flux-dev", "FLUX.1-dev")

# FLUX.2-klein 4B, transformer/config.json of black-forest-labs/FLUX.2-klein-4B and -klein-base-4B
# (the same architecture; base is not step-distilled): 5 double + 20 single blocks, 24 heads x 128,
# joint_attention_dim 7,680 = 3 stacked Qwen3-4B hidden states of 2,560 (layers 9, 18, 27, the
# Flux2KleinPipeline default), mlp_ratio 3, RoPE axes 4 x 32, theta 2,000, no guidance embeddings.
# Values as copied by several public projects that hard-code the hub file (no network here).
_FLUX2_KLEIN_4B = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
# FLUX.2's VAE: diffusers' AutoencoderKLFlux2 defaults (4 levels 128/256/512/512, 32 latent channels,
# 2x2 patches -> the transformer's 128 input channels), which diffusers ships as FLUX.2's.
_FLUX2_VAE: dict[str, Any] = {}
# SD3.5-medium, transformer/config.json of stabilityai/stable-diffusion-3.5-medium: 24 joint blocks,
# 24 heads x 64, MMDiT-X dual attention in blocks 0-12, RMS QK-norm, caption projection 1,536,
# pos_embed_max_size 384 (copied by several public projects that hard-code the hub file).
_SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# SD3's VAE: FLUX.1-dev's AutoencoderKL architecture (16 latent channels, 4 levels) with SD3's
# latent scaling_factor 1.5305 / shift_factor 0.0609 (vae/config.json of the SD3 / SD3.5 repositories).
_SD3_VAE = dict(FLUX_DEV.vae or {}, scaling_factor=1.5305, shift_factor=0.0609)

#: Built-in published architectures: name -> spec; the hub repository names that select them.
BUILTIN: dict[str, ModelSpec] = {
    "flux-dev": FLUX_DEV,
    "flux2-klein-base-4b": ModelSpec("FLUX.2-klein-base-4B", _FLUX2_KLEIN_4B, _FLUX2_VAE, 512,
                                     "built-in FLUX.2-klein-base-4B config", family="flux2", pipeline="Flux2KleinPipeline"),
    "flux2-klein-4b": ModelSpec("FLUX.2-klein-4B", _FLUX2_KLEIN_4B, _FLUX2_VAE, 512, "built-in FLUX.2-klein-4B config",
                                family="flux2", pipeline="Flux2KleinPipeline", distilled=True),
    "sd3.5-medium": ModelSpec("SD3.5-medium", _SD35_MEDIUM, _SD3_VAE, 256, "built-in SD3.5-medium config",
                              family="sd3", pipeline="StableDiffusion3Pipeline"),
}
_HUB_NAMES = {"flux.1-dev": "flux-dev", "flux.2-klein-base-4b": "flux2-klein-base-4b",
              "flux.2-klein-4b": "flux2-klein-4b", "stable-diffusion-3.5-medium": "sd3.5-medium"}


def _builtin(name: str, text_len: int | None, note: str | None = None) -> ModelSpec:
    if name not in BUILTIN:
        raise PlanError(f"unknown built-in model {name!r}; expected one of {sorted(BUILTIN)}")
    spec = BUILTIN[name]
    length = spec.text_len if text_len is None else text_len
    return replace(spec, text_len=length, notes=spec.notes + ((note,) if note else ()))


def _read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"model_path={str(path.parent.parent)!r} has no {path.parent.name}/config.json ({what} config); "
                        "expected a diffusers model folder (FLUX.1, FLUX.2 or SD3 layout)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} is not a readable JSON config: {exc}") from exc
    return {k: v for k, v in data.items() if not k.startswith("_")} | {"_class_name": data.get("_class_name")}


def _from_folder(folder: Path, text_len: int) -> ModelSpec:
    from leapalign.adapters.families import UnsupportedModelError, family_of_class, read_model_folder

    transformer = _read_config(folder / "transformer" / "config.json", "transformer")
    cls = transformer.pop("_class_name")
    try:
        family = family_of_class(str(cls), "transformer")
        info = read_model_folder(folder)
    except UnsupportedModelError as exc:
        raise PlanError(f"model_path={str(folder)!r}: transformer class {cls!r} cannot be planned: {exc}") from None
    if info.family is not family:
        raise PlanError(f"model_path={str(folder)!r}: model_index.json names a {info.pipeline} ({info.family.label}) "
                        f"but transformer/config.json a {cls}; they must be one family")
    vae_path = folder / "vae" / "config.json"
    vae = None
    if vae_path.is_file():
        vae = _read_config(vae_path, "vae")
        vae.pop("_class_name")
    return ModelSpec(folder.name, transformer, vae, text_len, f"config.json files in {folder}", family=family.name,
                     pipeline=info.pipeline or family.pipelines[0], distilled=bool(info.index.get("is_distilled", False)))


def model_spec(model_path: str | None, text_len: int = 512) -> ModelSpec:
    """The spec for ``model_path``: a folder, ``tiny:NAME``, ``builtin:NAME``, or the built-in FLUX.1-dev when empty.

    A path that does not exist on this machine (a config written for the training machine) plans
    the built-in architecture its folder name names (``/models/stable-diffusion-3.5-medium``: SD3.5-
    medium), else FLUX.1-dev, and says so; a folder that exists without ``transformer/config.json``
    is an error.
    """
    if model_path and model_path.startswith("tiny:"):
        return _named(model_path.split(":", 1)[1])
    if model_path and model_path.startswith("builtin:"):
        return _builtin(model_path.split(":", 1)[1], text_len)
    if not model_path:
        return FLUX_DEV
    folder = Path(model_path)
    if not folder.exists():
        name = _HUB_NAMES.get(folder.name.lower(), "flux-dev")
        note = f"model_path={model_path!r} does not exist here: planned the built-in {BUILTIN[name].name} config"
        return _builtin(name, text_len, note)
    if not folder.is_dir():
        raise PlanError(f"model_path={model_path!r} is not a folder; expected a diffusers model folder")
    return _from_folder(folder, text_len)


def clip_vit_h14_config() -> dict[str, Any]:
    """transformers ``CLIPConfig`` arguments of CLIP ViT-H/14 (PickScore_v1, laion2B ViT-H-14, HPSv2.1)."""
    return dict(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024,
    )

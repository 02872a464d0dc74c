"""What the planner builds, from ``config.json`` files only: transformer, VAE and reward shapes.

A :class:`ModelSpec` holds the diffusers configs of the transformer and the VAE and the text
conditioning shapes. Sources: a local diffusers model folder (``transformer/config.json`` and
``vae/config.json``, as ``FluxPipeline.save_pretrained`` writes them), or a named config of
:mod:`leapalign.models.tiny_flux` (``tiny:NAME``; FLUX.1-dev's published ``transformer/config.json``
and ``vae/config.json`` are its ``flux-dev`` entry, the default). Nothing here reads a weight file.

Reward models of known architecture are built the same way: a CLIP reward from its folder's
``config.json`` (PickScore_v1 is CLIP ViT-H/14 when the folder is absent here), HPSv2.1 as CLIP
ViT-H/14 shapes (open_clip's ``ViT-H-14``: the same widths, depths, heads and patch size).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PlanError", "ModelSpec", "FLUX_DEV", "model_spec", "clip_vit_h14_config"]


class PlanError(ValueError):
    """The planner cannot answer for this input; the message says which argument and why."""


@dataclass(frozen=True)
class ModelSpec:
    """A transformer + VAE to plan: configs, T5 length and where they came from."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any] | None
    text_len: int = 512
    source: str = "built-in"
    notes: tuple[str, ...] = field(default_factory=tuple)


def _named(name: str, label: str | None = None) -> ModelSpec:
    """A named config of :mod:`leapalign.models.tiny_flux` (``flux-dev`` is FLUX.1-dev's published one)."""
    from leapalign.models.tiny_flux import tiny_flux_spec

    try:
        spec = tiny_flux_spec(name)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return ModelSpec(label or name, dict(spec.transformer), dict(spec.vae) if spec.vae else None, spec.text_len,
                     f"leapalign.models.tiny_flux {name!r} config")


FLUX_DEV = _named("flux-dev", "FLUX.1-dev")

_TRANSFORMER_CLASSES = ("FluxTransformer2DModel",)


def _read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"model_path={str(path.parent.parent)!r} has no {path.parent.name}/config.json ({what} config); "
                        "expected a diffusers model folder (FLUX.1-dev layout)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} is not a readable JSON config: {exc}") from exc
    return {k: v for k, v in data.items() if not k.startswith("_")} | {"_class_name": data.get("_class_name")}


def _from_folder(folder: Path, text_len: int) -> ModelSpec:
    transformer = _read_config(folder / "transformer" / "config.json", "transformer")
    cls = transformer.pop("_class_name")
    if cls not in _TRANSFORMER_CLASSES:
        raise PlanError(f"model_path={str(folder)!r}: transformer class {cls!r} cannot be planned; "
                        f"the planner knows {list(_TRANSFORMER_CLASSES)}")
    vae_path = folder / "vae" / "config.json"
    vae = None
    if vae_path.is_file():
        vae = _read_config(vae_path, "vae")
        vae.pop("_class_name")
    return ModelSpec(folder.name, transformer, vae, text_len, f"config.json files in {folder}")


def model_spec(model_path: str | None, text_len: int = 512) -> ModelSpec:
    """The spec for ``model_path``: a folder, ``tiny:NAME``, or the built-in FLUX.1-dev when empty.

    A path that does not exist on this machine (a config written for the training machine) plans
    the built-in FLUX.1-dev and says so; a folder that exists without ``transformer/config.json`` is
    an error.
    """
    if model_path and model_path.startswith("tiny:"):
        return _named(model_path.split(":", 1)[1])
    if not model_path:
        return FLUX_DEV
    folder = Path(model_path)
    if not folder.exists():
        note = f"model_path={model_path!r} does not exist here: planned the built-in FLUX.1-dev config"
        return ModelSpec(FLUX_DEV.name, FLUX_DEV.transformer, FLUX_DEV.vae, text_len, FLUX_DEV.source, (note,))
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

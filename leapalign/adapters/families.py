"""The model families leapalign serves, and how one is recognised: by pipeline class, transformer
class, or a model folder's ``model_index.json`` / ``transformer/config.json``.

Everything above the adapters (trainer, CLI, planner, benchmarks) asks this module which family a
model is instead of assuming FLUX.1, and gets one :class:`UnsupportedModelError` line naming what
it found and what is supported when the answer is "none". What each family trains by default with
LoRA is here too (:func:`lora_target_modules`), read off the diffusers model source:

- FLUX.1 (``FluxTransformer2DModel``): the targets of diffusers' own FLUX.1 LoRA scripts --
  attention q/k/v/out and the context stream's projections, both feed-forwards, the single
  blocks' ``proj_mlp`` / ``proj_out``.
- FLUX.2 (``Flux2Transformer2DModel``): double blocks' ``attn.{to_q,to_k,to_v,to_out.0}``, the
  context stream's ``attn.{add_q_proj,add_k_proj,add_v_proj,to_add_out}``, the SwiGLU
  feed-forwards' ``linear_in`` / ``linear_out`` (image and context); single blocks' fused
  ``attn.to_qkv_mlp_proj`` and their ``attn.to_out``, named per block: in double blocks
  ``attn.to_out`` is a ``ModuleList`` that peft cannot wrap, so a bare suffix would match it.
- SD3 / SD3.5 (``SD3Transformer2DModel``): joint attention (``attn.*`` as FLUX.1's), SD3.5's
  dual image self-attention ``attn2.{to_q,to_k,to_v,to_out.0}``, both GELU feed-forwards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ModelFamily", "FAMILIES", "UnsupportedModelError", "family_named", "family_of_class", "family_of_pipeline",
    "family_of_network", "ModelFolder", "read_model_folder", "lora_target_modules", "supported_text",
]

_JOINT_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class UnsupportedModelError(ValueError):
    """A pipeline, transformer or model folder of a family leapalign does not serve (one line)."""


@dataclass(frozen=True)
class ModelFamily:
    """One family: its diffusers classes, its adapter and its pipeline's sampling defaults."""

    name: str  # "flux" | "flux2" | "sd3"
    label: str
    pipelines: tuple[str, ...]
    transformer: str
    vae: str
    adapter: str  # "module:Class"
    guidance: float  # the pipeline's default guidance_scale
    max_sequence_length: int  # the pipeline's default prompt length
    lora_targets: tuple[str, ...]  # block-independent LoRA targets (see lora_target_modules)

    def adapter_class(self) -> type:
        import importlib

        module, name = self.adapter.split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, ModelFamily] = {
    "flux": ModelFamily(
        "flux", "FLUX.1", ("FluxPipeline",), "FluxTransformer2DModel", "AutoencoderKL",
        "leapalign.adapters.flux:FluxVelocityModel", 3.5, 512,
        tuple(_JOINT_ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                  "proj_mlp", "proj_out"]),
    ),
    "flux2": ModelFamily(
        "flux2", "FLUX.2 dev / klein", ("Flux2Pipeline", "Flux2KleinPipeline"), "Flux2Transformer2DModel",
        "AutoencoderKLFlux2", "leapalign.adapters.flux2:Flux2VelocityModel", 4.0, 512,
        tuple(_JOINT_ATTENTION + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                                  "attn.to_qkv_mlp_proj"]),
    ),
    "sd3": ModelFamily(
        "sd3", "SD3 / SD3.5", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel", "AutoencoderKL",
        "leapalign.adapters.sd3:SD3VelocityModel", 7.0, 256,
        tuple(_JOINT_ATTENTION + ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                  "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]),
    ),
}


def supported_text(kind: str = "pipeline") -> str:
    """``"FluxPipeline (FLUX.1), ..."`` (``kind="pipeline"``) or the transformer classes (``"transformer"``)."""
    if kind == "pipeline":
        return ", ".join(f"{p} ({f.label})" for f in FAMILIES.values() for p in f.pipelines)
    return ", ".join(f"{f.transformer} ({f.label})" for f in FAMILIES.values())


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _lookup(class_name: str, kind: str = "any") -> ModelFamily | None:
    for family in FAMILIES.values():
        if (kind != "transformer" and class_name in family.pipelines) or (kind != "pipeline" and class_name == family.transformer):
            return family
    return None


def family_of_class(class_name: str, what: str = "model") -> ModelFamily:
    """The family of a pipeline or transformer class name; an error naming ``what`` and the supported ones."""
    family = _lookup(class_name)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported {what} class {class_name!r}; supported pipelines: {supported_text()}; "
            f"transformers: {supported_text('transformer')}"
        )
    return family


def _family_along_mro(obj: Any, what: str, kind: str) -> ModelFamily:
    for cls in type(obj).__mro__:
        family = _lookup(cls.__name__, kind)
        if family is not None:
            return family
    found = type(obj)
    raise UnsupportedModelError(
        f"unsupported {what}: got {found.__name__} (from {found.__module__}); supported: "
        f"{supported_text(kind)}"
    )


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline (or a subclass of a supported one)."""
    return _family_along_mro(pipe, "pipeline family", "pipeline")


def family_of_network(net: Any) -> ModelFamily:
    """The family of a denoiser network by its class (subclasses and FSDP2 wrappers match by name)."""
    return _family_along_mro(net, "transformer", "transformer")


@dataclass(frozen=True)
class ModelFolder:
    """What a local diffusers model folder says about itself (no weight is read)."""

    path: Path
    family: ModelFamily
    pipeline: str | None  # model_index.json's _class_name; None without model_index.json
    index: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"{path} is not a readable JSON file: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def read_model_folder(path: str | Path) -> ModelFolder:
    """The family of the model in ``path``: ``model_index.json``'s pipeline class, else
    ``transformer/config.json``'s class. A folder with neither, or of another family, is an error."""
    folder = Path(path)
    index_path, transformer_path = folder / "model_index.json", folder / "transformer" / "config.json"
    if index_path.is_file():
        index = _read_json(index_path)
        cls = index.get("_class_name")
        if not isinstance(cls, str):
            raise UnsupportedModelError(f"{index_path} names no pipeline class (_class_name); expected one of {supported_text()}")
        family = _lookup(cls, "pipeline")
        if family is None:
            raise UnsupportedModelError(
                f"{folder} holds a {cls} (model_index.json); supported pipelines: {supported_text()}")
        return ModelFolder(folder, family, cls, index)
    if transformer_path.is_file():
        cls = _read_json(transformer_path).get("_class_name")
        return ModelFolder(folder, family_of_class(str(cls), f"transformer (in {transformer_path})"), None, {})
    raise UnsupportedModelError(
        f"{folder} is not a diffusers model folder (no model_index.json or transformer/config.json)")


def lora_target_modules(family: ModelFamily, net: Any = None) -> list[str]:
    """The family's default LoRA targets for ``net`` (FLUX.2 names each single block's ``attn.to_out``)."""
    targets = list(family.lora_targets)
    if family.name == "flux2":
        if net is None:
            raise ValueError("FLUX.2's LoRA targets name each single block: pass the transformer")
        targets += [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(net.single_transformer_blocks))]
    return targets

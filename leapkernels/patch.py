"""`apply_leapkernels(transformer)`: the fused ops swapped into whichever supported diffusers
transformer it is given, chosen by the model's class; `revert_leapkernels` undoes it bit for bit.

Families (each its own module, its own switches, its own parity tests):
    ``FluxTransformer2DModel``   `leapkernels.flux`   (FLUX.1)       `FluxPatchOptions`
    ``Flux2Transformer2DModel``  `leapkernels.flux2`  (FLUX.2)       `Flux2PatchOptions`
    ``SD3Transformer2DModel``    `leapkernels.sd3`    (SD3 / SD3.5)  `SD3PatchOptions`
Subclasses count as their family. Anything else raises `UnsupportedModelError` naming the class
found and the supported ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from leapkernels import flux, flux2, sd3
from leapkernels.fusions import OPTIONS
from leapkernels.fusions import is_patched as _any_patched


class UnsupportedModelError(TypeError):
    """The model is not of a class leapkernels can patch."""


@dataclass(frozen=True)
class Family:
    """A patchable model family: the diffusers class, its patch, its revert, its switches."""

    name: str
    model_class: str
    apply: Callable[..., Any]
    revert: Callable[[nn.Module], None]
    options: type


FAMILIES: tuple[Family, ...] = (
    Family("flux", "FluxTransformer2DModel", flux.apply_leapkernels_to_flux, flux.revert_leapkernels, flux.FluxPatchOptions),
    Family("flux2", "Flux2Transformer2DModel", flux2.apply_leapkernels_to_flux2, flux2.revert_flux2,
           flux2.Flux2PatchOptions),
    Family("sd3", "SD3Transformer2DModel", sd3.apply_leapkernels_to_sd3, sd3.revert_sd3, sd3.SD3PatchOptions),
)


def supported_models() -> tuple[str, ...]:
    """The diffusers transformer classes `apply_leapkernels` patches."""
    return tuple(f.model_class for f in FAMILIES)


def model_family(transformer: object) -> Family:
    """The family of ``transformer`` (by its diffusers class, subclasses included), or
    `UnsupportedModelError` naming the class found and the supported ones."""
    import diffusers

    for family in FAMILIES:
        cls = getattr(diffusers, family.model_class, None)
        if cls is not None and isinstance(transformer, cls):
            return family
    found = type(transformer)
    raise UnsupportedModelError(
        f"leapkernels cannot patch a {found.__module__}.{found.__qualname__}; supported transformers: "
        f"{', '.join('diffusers.' + c for c in supported_models())}"
    )


def _switches(family: Family, options: Any) -> dict[str, bool]:
    """``options`` (None, a mapping of switch -> bool, or the family's options dataclass) as keywords."""
    cls = family.options
    if options is None:
        return {}
    if isinstance(options, cls):
        return dataclasses.asdict(options)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        raise TypeError(f"options for a {family.model_class} must be a {cls.__name__} or a mapping, "
                        f"got a {type(options).__name__}")
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be None, a mapping of switch -> bool or a {cls.__name__}, got {type(options).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown leapkernels switch(es) {unknown} for a {family.model_class}; known: {known}")
    return {k: bool(v) for k, v in options.items()}


def apply_leapkernels(transformer: nn.Module, options: Any = None, *, allow_unverified_diffusers: bool = False) -> nn.Module:
    """Patch ``transformer`` in place with the fused ops of its family; returns it.

    ``options``: None (every fusion on), a mapping of switch name -> bool (the others stay on), or
    the family's options dataclass. Patching a patched model replaces the previous switches. The
    installed diffusers must be a verified one (see `leapkernels.fusions.VERIFIED_DIFFUSERS`)
    unless ``allow_unverified_diffusers``. Undo with `revert_leapkernels`.
    """
    family = model_family(transformer)
    family.apply(transformer, **_switches(family, options), allow_unverified_diffusers=allow_unverified_diffusers)
    return transformer


def revert_leapkernels(transformer: nn.Module) -> nn.Module:
    """Undo `apply_leapkernels` (original forwards and processors: bit-identical outputs); returns it.
    A model that is not patched is returned unchanged."""
    family = model_family(transformer)
    family.revert(transformer)
    return transformer


def is_patched(transformer: nn.Module) -> bool:
    """Whether leapkernels' fused ops are in effect anywhere in ``transformer``."""
    return _any_patched(transformer)


def patch_options(transformer: nn.Module) -> dict[str, bool] | None:
    """The switches in effect on a patched ``transformer`` (``None`` if unpatched)."""
    for module in transformer.modules():
        if hasattr(module, OPTIONS):
            return dataclasses.asdict(getattr(module, OPTIONS))
    return None

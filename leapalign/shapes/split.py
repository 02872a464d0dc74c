"""The held-out prompt split of the shapes world, and the grammar it is cut from.

:func:`grammar_specs` enumerates every prompt the grammar (and :func:`~leapalign.shapes.world.sample_spec`)
can produce. The held-out split takes, per category, the prompts ordered by CRC-32 of their text
(stable across Python runs and machines, unlike ``hash()``), the first ceil(20 %): at least one prompt
of every category, e.g. 1 of the 3 single_object prompts and 168 of the 840 position ones. Alignment
runs train on :func:`training_specs`, which never draws them; the held-out evaluation
(:func:`heldout_eval_prompts`) draws only them. The shipped model, scorer and hardening rounds
predate the split and drew from the whole grammar (pretraining alone drew 192,000 prompts from its
993), so for them no prompt is unseen: the split is held out from alignment only.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Sequence

import torch

from leapalign.shapes.world import (
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    _choice,
    parse_prompt,
    sample_spec,
)

__all__ = ["grammar_specs", "HELDOUT_FRACTION", "heldout_texts", "is_heldout", "heldout_eval_prompts", "training_specs",
           "training_prompts", "train_categories_arg"]


def grammar_specs(category: str) -> list[PromptSpec]:
    """Every distinct prompt of ``category`` the grammar (and :func:`sample_spec`) can produce, in a fixed order.

    Sizes: single_object 3, colors 15, two_object 6, counting 9, color_attr 120, position 840 (993 in all).
    """
    colors = tuple(COLORS)
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if category == "single_object":
        return [PromptSpec(category, (ObjectSpec(s),)) for s in SHAPES]
    if category == "colors":
        return [PromptSpec(category, (ObjectSpec(s, c),)) for s in SHAPES for c in colors]
    if category == "two_object":
        return [PromptSpec(category, (ObjectSpec(a), ObjectSpec(b))) for a, b in pairs]
    if category == "counting":
        return [PromptSpec(category, (ObjectSpec(s, None, n),)) for s in SHAPES for n in COUNT_WORDS]
    if category == "color_attr":
        return [PromptSpec(category, (ObjectSpec(a, c1), ObjectSpec(b, c2))) for a, b in pairs for c1 in colors for c2 in colors if c1 != c2]
    if category == "position":
        objs = [ObjectSpec(s, c) for s in SHAPES for c in colors]
        return [PromptSpec(category, (a, b), relation=r) for a in objs for b in objs if a != b for r in RELATIONS]
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


HELDOUT_FRACTION = 0.2


@functools.lru_cache(maxsize=None)
def _heldout_by_category() -> dict[str, tuple[PromptSpec, ...]]:
    out = {}
    for c in CATEGORIES:
        specs = sorted(grammar_specs(c), key=lambda s: (zlib.crc32(s.text.encode()), s.text))
        out[c] = tuple(specs[: math.ceil(HELDOUT_FRACTION * len(specs))])
    return out


def heldout_texts() -> frozenset[str]:
    """The texts of the held-out split (every category)."""
    return frozenset(s.text for specs in _heldout_by_category().values() for s in specs)


def is_heldout(spec: PromptSpec | str) -> bool:
    """Whether a prompt (spec or text) is in the held-out split."""
    text = spec.text if isinstance(spec, PromptSpec) else parse_prompt(spec).text
    return text in heldout_texts()


def heldout_eval_prompts(n: int = 96, seed: int = 4321) -> list[PromptSpec]:
    """A fixed evaluation set drawn only from the held-out split: categories round-robin, prompts
    uniform within the category's held-out ones (with repeats where a category holds few)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    held = _heldout_by_category()
    return [_choice(held[CATEGORIES[i % len(CATEGORIES)]], g) for i in range(n)]


def training_specs(n: int, seed: int | torch.Generator, categories: tuple[str, ...] = CATEGORIES) -> list[PromptSpec]:
    """The alignment runs' prompt sampler: :func:`sample_specs`'s distribution with the held-out split
    removed (a held-out draw is redrawn from the same category), so no held-out prompt is ever trained on."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    held = heldout_texts()
    out = []
    for _ in range(n):
        category = _choice(categories, g)
        spec = sample_spec(category, g)
        while spec.text in held:
            spec = sample_spec(category, g)
        out.append(spec)
    return out


def training_prompts(seed: int, categories: Sequence[str] | None = None, n: int = 4096) -> list[str]:
    """A run's ``n`` training prompts: the world's sampler without the held-out split, from a seed unrelated to the
    eval sets'; with ``categories``, only prompts of those: the whole-grammar run's own prompts of those categories,
    in order (the sampler drawn on until there are ``n``), so a run on some categories sees what the full run saw of them."""
    base = seed + 100_003
    if categories is None:
        return [s.text for s in training_specs(n, seed=base)]
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"categories must be a non-empty subset of {list(CATEGORIES)}, got {list(categories)}")
    out: list[str] = []
    for draw in range(100):
        out += [s.text for s in training_specs(4 * n, seed=base + draw) if s.category in categories]
        if len(out) >= n:
            return out[:n]
    raise RuntimeError(f"could not draw {n} training prompts of {list(categories)}")


def train_categories_arg(values: Sequence[str]) -> tuple[str, ...] | None:
    """``--train-categories`` of the demo and the study: ``all`` alone is the whole grammar (None), else the names."""
    if "all" in values:
        if len(values) > 1:
            raise ValueError("--train-categories: 'all' is the whole grammar; give it alone or name categories")
        return None
    return tuple(values)

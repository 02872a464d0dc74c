"""Labelled image-prompt pools: what the shapes scorer trains on, and what hardening adds to.

Every pool holds images with the rule-based evaluator's verdict (is this image right for this
prompt?) and the exact detector's per-(colour, shape) counts and centres, the auxiliary targets of
:func:`leapalign.shapes.scorer.fit`. Pools come from three places: rendered ground truth, near
misses and mismatches (:func:`synthetic_pool`); samples of an image model (:func:`model_samples`);
and images pushed straight up a scorer in pixel space (:func:`pixel_attack`), the cheapest hacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from leapalign.shapes.evaluator import detect_objects, evaluate
from leapalign.shapes.world import CATEGORIES, COLORS, COUNT_WORDS, SHAPES, corrupt_spec, render_batch, sample_specs

__all__ = ["DETECTED_PAIRS", "MAX_COUNT", "LabelledPool", "synthetic_pool", "model_samples", "pixel_attack"]

# What the soft detector counts: every (colour, shape) pair, "unknown" (a blob the evaluator cannot
# classify) included -- such a blob still counts towards the total, exactly as in the evaluator, so
# drawing junk is never free.
DETECTED_PAIRS: tuple[tuple[str, str], ...] = tuple((c, sh) for c in COLORS for sh in SHAPES + ("unknown",))
MAX_COUNT = max(COUNT_WORDS)


@dataclass
class LabelledPool:
    """Image-prompt pairs with the evaluator's verdict and the exact detector's targets (CPU tensors).

    ``labels [N]`` 1.0 where the rule-based evaluator accepts the pair; ``counts [N, 20]`` (capped at
    4), ``centres [N, 20, 2]`` in [-1, 1] and ``present [N, 20]`` are the auxiliary detection
    targets: what :func:`leapalign.shapes.evaluator.detect_objects` finds, per (colour, shape-or-unknown).
    """

    images: torch.Tensor
    prompts: list[str]
    labels: torch.Tensor
    counts: torch.Tensor
    centres: torch.Tensor
    present: torch.Tensor

    @classmethod
    def label(cls, images: torch.Tensor, prompts: Sequence[str], labels: torch.Tensor | None = None) -> "LabelledPool":
        """Pool of ``images`` for ``prompts``; labels from the exact evaluator unless given."""
        images = images.detach().float().cpu().clamp(0.0, 1.0)
        if labels is None:
            labels = torch.tensor([float(j.correct) for j in evaluate(images, list(prompts))])
        return cls(images, list(prompts), labels.float(), *_detection_targets(images))

    def __len__(self) -> int:
        return len(self.prompts)

    def __add__(self, other: "LabelledPool") -> "LabelledPool":
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        return LabelledPool(
            cat(self.images, other.images), self.prompts + other.prompts, cat(self.labels, other.labels),
            cat(self.counts, other.counts), cat(self.centres, other.centres), cat(self.present, other.present),
        )


def synthetic_pool(n: int, g: torch.Generator) -> LabelledPool:
    """``n`` rendered pairs: 1/2 ground truth, 1/3 near misses, 1/6 renders of another prompt."""
    specs = sample_specs(n, g)
    n_pos, n_near = n // 2, n // 3
    shown = list(specs[:n_pos])
    shown += [corrupt_spec(s, g)[0] for s in specs[n_pos : n_pos + n_near]]
    shown += sample_specs(n - n_pos - n_near, g)  # mismatched: another random prompt's image
    images = render_batch(shown, g)
    labels = torch.zeros(n)
    labels[:n_pos] = 1.0
    # A "mismatched" draw can coincide with its prompt; label by the exact evaluator, never by hope.
    mism = slice(n_pos + n_near, n)
    labels[mism] = torch.tensor([float(j.correct) for j in evaluate(images[mism], specs[mism])])
    return LabelledPool.label(images, [s.text for s in specs], labels)


def _detection_targets(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Auxiliary targets from the exact detector: per (colour, shape-or-unknown) the count (capped at 4,
    int64 ``[B, 20]``), the mean centre in [-1, 1] (``[B, 20, 2]``) and where a centre exists (``[B, 20]``)."""
    index = {pair: i for i, pair in enumerate(DETECTED_PAIRS)}
    b, size = images.shape[0], images.shape[-1]
    counts = torch.zeros(b, len(DETECTED_PAIRS), dtype=torch.long)
    centres = torch.zeros(b, len(DETECTED_PAIRS), 2)
    for i, objs in enumerate(detect_objects(images)):
        for o in objs:
            if (o.color, o.shape) in index:
                k = index[(o.color, o.shape)]
                counts[i, k] += 1
                centres[i, k] += torch.tensor(o.centroid) / size * 2.0 - 1.0
    present = counts > 0
    centres = centres / counts.clamp_min(1).unsqueeze(-1)
    return counts.clamp_max(MAX_COUNT), centres, present


def pixel_attack(scorer: torch.nn.Module, pool: LabelledPool, steps: int, step_size: float = 0.03, batch_size: int = 256) -> LabelledPool:
    """``pool``'s images pushed straight up the scorer's ``log p`` (signed gradient ascent on the pixels,
    kept in [0, 1]), relabelled by the evaluator: the cheapest hacks there are, found without a generator."""
    out = []
    for i in range(0, len(pool), batch_size):
        x = pool.images[i : i + batch_size].clone().requires_grad_(True)
        prompts = pool.prompts[i : i + batch_size]
        for _ in range(steps):
            (grad,) = torch.autograd.grad(F.logsigmoid(scorer.logits(x, prompts)).sum(), x)
            with torch.no_grad():
                x.add_(step_size * grad.sign()).clamp_(0.0, 1.0)
        out.append(x.detach())
    return LabelledPool.label(torch.cat(out), pool.prompts)


def model_samples(model: Any, n: int, num_steps: int, seed: int, batch_size: int = 60,
                  categories: tuple[str, ...] = CATEGORIES) -> LabelledPool:
    """``n`` samples of a shapes model (``ShapesVelocityModel``) on random prompts of ``categories``, labelled."""
    prompts = [s.text for s in sample_specs(n, seed + 100, categories)]
    g = torch.Generator().manual_seed(seed + 101)
    with torch.no_grad():
        images = torch.cat([model.sample(prompts[i : i + batch_size], num_steps, g) for i in range(0, n, batch_size)])
    return LabelledPool.label(images, prompts)

"""Exact rule-based evaluator for the shapes world: GenEval's role, no learned parts.

Pipeline per image: (1) colour segmentation -- each pixel goes to the nearest palette colour or the
background if it lies within ``tol`` (RGB Euclidean distance), else it is left unassigned;
(2) 8-connected components per colour, components smaller than ``min_area`` pixels ignored as
speckle; (3) shape classification by the best intersection-over-union with each shape's ideal mask
inscribed in the component's bounding box (square, circle, apex-up triangle), else ``"unknown"``; (4) the prompt's rules: every object group has
exactly its count, no extra objects, and for position prompts the centroid offset between the two
objects lies along the named axis (``|along| > |across|`` and ``along > margin`` pixels).

It never trains and never sees gradients: it is the ground-truth judge the learned scorer is
compared with.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from leapalign.shapes.world import BACKGROUND, CATEGORIES, COLORS, PromptSpec, parse_prompt

__all__ = [
    "DetectedObject",
    "Judgement",
    "detect_objects",
    "classify_shape",
    "judge",
    "evaluate",
    "accuracy_by_category",
    "ARTIFACT_TOL",
    "background_artifact_share",
]

_PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)


@dataclass(frozen=True)
class DetectedObject:
    """A connected component of one palette colour; ``centroid`` is ``(x, y)`` in pixels."""

    shape: str
    color: str
    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


@dataclass
class Judgement:
    """One image's verdict against its prompt, with the reason when wrong."""

    prompt: str
    category: str
    correct: bool
    reason: str = ""
    objects: list[DetectedObject] = field(default_factory=list)


def _templates(height: int, width: int) -> dict[str, torch.Tensor]:
    """Ideal masks of each shape inscribed in a ``height x width`` box (pixel centres, as drawn)."""
    v = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return {
        "square": torch.ones(height, width, dtype=torch.bool),
        "circle": (uu - 0.5) ** 2 + (vv - 0.5) ** 2 <= 0.25,
        "triangle": (uu - 0.5).abs() <= vv / 2.0,
    }


def classify_shape(mask: torch.Tensor, min_iou: float = 0.6) -> str:
    """Shape of one component from its bounding-box crop ``mask [h, w]`` (bool).

    The crop is compared with each shape's ideal mask inscribed in the same box; the best
    intersection-over-union wins if it reaches ``min_iou``, else ``"unknown"``. Ground-truth shapes
    match their own template almost exactly (IoU > 0.85) and the others far less (< 0.8), and the
    test degrades gracefully on ragged edges, unlike a threshold on the fill ratio alone.
    """
    h, w = mask.shape
    if not 0.6 <= w / h <= 1.67 or min(w, h) < 3:
        return "unknown"
    best, best_iou = "unknown", min_iou
    for name, tmpl in _templates(h, w).items():
        iou = float((mask & tmpl).sum()) / float((mask | tmpl).sum())
        if iou >= best_iou:
            best, best_iou = name, iou
    return best


def _segment(images: torch.Tensor, tol: float) -> torch.Tensor:
    """``[B, H, W]`` labels: 0..K-1 palette colour, K background, -1 unassigned."""
    palette = torch.tensor([COLORS[c] for c in _PALETTE_NAMES] + [BACKGROUND], dtype=torch.float32)
    x = images.detach().to(torch.float32)
    dist = (x.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)).square().sum(2).sqrt()  # [B, K+1, H, W]
    best, label = dist.min(1)
    return torch.where(best <= tol, label, torch.full_like(label, -1))


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component ids of boolean masks ``[M, H, W]`` by max-label propagation (0 = none)."""
    m, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(m, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))
    for _ in range(h * w):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
        grown = torch.where(mask, grown, torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.to(torch.long)


def detect_objects(images: torch.Tensor, tol: float = 0.3, min_area: int = 12) -> list[list[DetectedObject]]:
    """Objects found in each image of ``images [B, 3, H, W]`` (values in [0, 1])."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    seg = _segment(images, tol)
    b, h, w = seg.shape
    k = len(_PALETTE_NAMES)
    masks = torch.stack([seg == c for c in range(k)], 1).view(b * k, h, w)
    comps = _components(masks).view(b, k, h, w)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    found: list[list[DetectedObject]] = []
    for i in range(b):
        objs: list[DetectedObject] = []
        for c in range(k):
            lab = comps[i, c]
            for cid in lab.unique().tolist():
                if cid == 0:
                    continue
                sel = lab == cid
                area = int(sel.sum())
                if area < min_area:
                    continue
                xs, ys = xx[sel], yy[sel]
                x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
                shape = classify_shape(sel[y0 : y1 + 1, x0 : x1 + 1])
                centroid = (float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5)
                objs.append(DetectedObject(shape, _PALETTE_NAMES[c], area, centroid, (x0, y0, x1, y1)))
        found.append(objs)
    return found


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str, margin: float) -> bool:
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > margin and abs(along) > abs(across)


def judge(spec: PromptSpec, objects: list[DetectedObject], margin: float = 2.0) -> tuple[bool, str]:
    """Whether ``objects`` satisfy ``spec`` exactly; the reason when not."""
    if len(objects) != spec.total_objects:
        return False, f"expected {spec.total_objects} object(s), found {len(objects)}"
    groups = []
    for o in spec.objects:
        members = [d for d in objects if o.matches(d.shape, d.color)]
        if len(members) != o.count:
            what = f"{o.color + ' ' if o.color else ''}{o.shape}"
            return False, f"expected {o.count} {what}, found {len(members)}"
        groups.append(members)
    if spec.relation is not None and not _relation_holds(groups[0][0], groups[1][0], spec.relation, margin):
        return False, f"relation {spec.relation!r} does not hold"
    return True, ""


def evaluate(
    images: torch.Tensor,
    prompts: Sequence[str | PromptSpec],
    tol: float = 0.3,
    min_area: int = 12,
    margin: float = 2.0,
) -> list[Judgement]:
    """Judge each image of ``images [B, 3, H, W]`` in [0, 1] against its prompt (text or spec)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"evaluate got {images.shape[0]} images but {len(prompts)} prompts; they must match")
    specs = [p if isinstance(p, PromptSpec) else parse_prompt(p) for p in prompts]
    detections = detect_objects(images, tol=tol, min_area=min_area)
    out = []
    for spec, objs in zip(specs, detections):
        ok, reason = judge(spec, objs, margin)
        out.append(Judgement(spec.text, spec.category, ok, reason, objs))
    return out


def accuracy_by_category(judgements: Sequence[Judgement]) -> dict[str, float]:
    """Fraction correct per category present, plus ``"overall"`` (mean over images)."""
    if not judgements:
        raise ValueError("accuracy_by_category got no judgements")
    per: dict[str, list[bool]] = defaultdict(list)
    for j in judgements:
        per[j.category].append(j.correct)
    acc = {c: sum(per[c]) / len(per[c]) for c in CATEGORIES if c in per}
    acc["overall"] = sum(j.correct for j in judgements) / len(judgements)
    return acc


COLOUR_SHARES_KEY = "colour_shares_colourless_prompts"  # free_colour_shares in an evaluation's JSON


def free_colour_shares(judgements: Sequence[Judgement]) -> dict[str, float]:
    """Share of each colour among the objects detected on prompts that name no colour ("a circle", "two squares"),
    where any colour passes: a model that draws them all in one colour has lost a diversity accuracy cannot see."""
    counts = dict.fromkeys(COLORS, 0)
    for j in judgements:
        if parse_prompt(j.prompt).names_no_colour:
            for obj in j.objects:
                counts[obj.color] += 1
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()} if total else {}


ARTIFACT_TOL = 0.1  # RGB distance to the background colour beyond which a background pixel is an artifact


@torch.no_grad()
def background_artifact_share(images: torch.Tensor, tol: float = 0.3, min_area: int = 12, artifact_tol: float = ARTIFACT_TOL) -> torch.Tensor:
    """``[B]``: the share of each image's background pixels that differ from the background colour.

    Background = every pixel outside the evaluator's objects (palette-colour components of at least
    ``min_area`` pixels, segmented at ``tol``), the objects grown by one pixel so their soft edges do
    not count. A background pixel is an artifact when its RGB distance to :data:`BACKGROUND`
    exceeds ``artifact_tol`` (0.1, a third of the evaluator's colour tolerance): faint textures the
    evaluator reads as background, unassigned pixels and speckle below ``min_area`` all count. It
    measures what a hacked scorer can add without the evaluator noticing; a ground-truth render
    scores exactly 0.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    x = images.detach().to(torch.float32)
    seg = _segment(x, tol)
    b, h, w = seg.shape
    k = len(_PALETTE_NAMES)
    comps = _components(torch.stack([seg == c for c in range(k)], 1).view(b * k, h, w))
    objects = torch.zeros(b * k, h, w, dtype=torch.bool)
    for i in range(b * k):
        ids, counts = comps[i].unique(return_counts=True)
        keep = ids[(ids != 0) & (counts >= min_area)]
        if keep.numel():
            objects[i] = torch.isin(comps[i], keep)
    objects = objects.view(b, k, h, w).any(1)
    grown = F.max_pool2d(objects.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0
    background = ~grown
    off = (x - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).square().sum(1).sqrt() > artifact_tol
    return (off & background).sum((1, 2)).float() / background.sum((1, 2)).clamp_min(1).float()

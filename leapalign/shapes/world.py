"""The shapes world: coloured shapes on a plain background, with GenEval-like prompts.

Everything here is deterministic from a seed. A prompt is always derived from a structured
:class:`PromptSpec` (and parsed back by :func:`parse_prompt`), so the rule-based evaluator checks an
image against exactly what the text says. Images are ``[3, H, W]`` float tensors in [0, 1] with
hard edges and exact palette colours; objects never touch (>= ``MIN_GAP`` pixels apart), so colour
segmentation plus connected components recovers every object of a ground-truth render.

Categories (GenEval's, adapted to the world):

=============  ==========================================  =================================
category       prompt                                      what must be in the image
=============  ==========================================  =================================
single_object  ``a circle``                                exactly one circle, any colour
colors         ``a red circle``                            exactly one red circle
two_object     ``a circle and a square``                   one circle and one square
counting       ``three triangles``                         exactly three triangles
position       ``a red circle above a blue square``        both, red circle's centre higher
color_attr     ``a red circle and a blue square``          both, colours bound to the shapes
=============  ==========================================  =================================

"Exactly" is strict: an image with any extra object is judged wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "SHAPES",
    "COLORS",
    "BACKGROUND",
    "RELATIONS",
    "CATEGORIES",
    "COUNT_WORDS",
    "IMAGE_SIZE",
    "MIN_GAP",
    "ObjectSpec",
    "PromptSpec",
    "Placement",
    "parse_prompt",
    "sample_spec",
    "sample_specs",
    "eval_prompts",
    "place_objects",
    "render",
    "render_spec",
    "render_batch",
    "draw_shape",
    "CORRUPTIONS",
    "corrupt_spec",
]

IMAGE_SIZE = 32
MIN_GAP = 2  # pixels of background between any two objects' bounding boxes

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Well separated in RGB (min pairwise distance ~0.55, >= 0.75 to the background).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
}
BACKGROUND: tuple[float, float, float] = (0.95, 0.95, 0.95)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()}


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color=None`` means any colour (each may differ)."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)} or None, got {self.color!r}")
        if not 1 <= self.count <= max(COUNT_WORDS):
            raise ValueError(f"count must be in [1, {max(COUNT_WORDS)}], got {self.count}")

    def matches(self, shape: str, color: str) -> bool:
        """Whether a detected object of ``shape``/``color`` belongs to this group."""
        return shape == self.shape and (self.color is None or color == self.color)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt's structure. ``relation`` (position only) reads ``objects[0] relation objects[1]``."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS} or None, got {self.relation!r}")
        n = len(self.objects)
        expected = 2 if self.category in ("two_object", "position", "color_attr") else 1
        if n != expected:
            raise ValueError(f"category {self.category!r} needs {expected} object groups, got {n}")
        if (self.category == "position") != (self.relation is not None):
            raise ValueError(f"relation must be set exactly for position prompts, got {self.relation!r} for {self.category!r}")
        if n == 2:
            a, b = self.objects
            # Groups must be disjoint so that "each group's count is exact" is well defined.
            if a.shape == b.shape and (a.color is None or b.color is None or a.color == b.color):
                raise ValueError(f"the two object groups must be distinguishable, got {a} and {b}")

    @property
    def names_no_colour(self) -> bool:
        """True for "a circle", "two squares": any colour satisfies the prompt."""
        return all(o.color is None for o in self.objects)

    @property
    def total_objects(self) -> int:
        return sum(o.count for o in self.objects)

    @property
    def text(self) -> str:
        """The prompt, a pure function of the spec (inverse of :func:`parse_prompt`)."""
        if self.category == "counting":
            o = self.objects[0]
            return f"{COUNT_WORDS[o.count]} {o.shape}s"
        phrases = [" ".join(["a"] + ([o.color] if o.color else []) + [o.shape]) for o in self.objects]
        if self.category == "position":
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        return " and ".join(phrases)


@dataclass(frozen=True)
class Placement:
    """One drawn object: bounding box top-left ``(x, y)`` and side ``size`` in pixels."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2.0, self.y + self.size / 2.0)


_SHAPE_RE = "|".join(SHAPES)
_COLOR_RE = "|".join(COLORS)
_REL_RE = "|".join(RELATIONS)
_OBJ = rf"a (?:({_COLOR_RE}) )?({_SHAPE_RE})"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("counting", re.compile(rf"^({'|'.join(_WORD_COUNTS)}) ({_SHAPE_RE})s$")),
    ("position", re.compile(rf"^a ({_COLOR_RE}) ({_SHAPE_RE}) ({_REL_RE}) a ({_COLOR_RE}) ({_SHAPE_RE})$")),
    ("pair", re.compile(rf"^{_OBJ} and {_OBJ}$")),
    ("single", re.compile(rf"^{_OBJ}$")),
)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the world's grammar back into its :class:`PromptSpec`.

    Raises ``ValueError`` naming the prompt when it is not in the grammar (see the module table).
    """
    t = " ".join(text.strip().lower().split())
    for kind, pattern in _PATTERNS:
        m = pattern.match(t)
        if m is None:
            continue
        g = m.groups()
        if kind == "counting":
            return PromptSpec("counting", (ObjectSpec(g[1], None, _WORD_COUNTS[g[0]]),))
        if kind == "position":
            return PromptSpec("position", (ObjectSpec(g[1], g[0]), ObjectSpec(g[4], g[3])), relation=g[2])
        if kind == "pair":
            a, b = ObjectSpec(g[1], g[0]), ObjectSpec(g[3], g[2])
            if (a.color is None) != (b.color is None):
                break
            return PromptSpec("color_attr" if a.color else "two_object", (a, b))
        return PromptSpec("colors" if g[0] else "single_object", (ObjectSpec(g[1], g[0]),))
    raise ValueError(
        f"prompt {text!r} is not in the shapes world's grammar; expected e.g. 'a circle', 'a red circle', "
        "'a circle and a square', 'three triangles', 'a red circle above a blue square', "
        "'a red circle and a blue square'"
    )


def _choice(seq, g: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=g))]


def _two_distinct(seq, g: torch.Generator):
    idx = torch.randperm(len(seq), generator=g)[:2].tolist()
    return seq[idx[0]], seq[idx[1]]


def sample_spec(category: str, g: torch.Generator) -> PromptSpec:
    """One random spec of ``category`` drawn with ``g`` (deterministic given the generator state)."""
    colors = tuple(COLORS)
    if category == "single_object":
        return PromptSpec(category, (ObjectSpec(_choice(SHAPES, g)),))
    if category == "colors":
        return PromptSpec(category, (ObjectSpec(_choice(SHAPES, g), _choice(colors, g)),))
    if category == "two_object":
        s1, s2 = _two_distinct(SHAPES, g)
        return PromptSpec(category, (ObjectSpec(s1), ObjectSpec(s2)))
    if category == "counting":
        return PromptSpec(category, (ObjectSpec(_choice(SHAPES, g), None, _choice(tuple(COUNT_WORDS), g)),))
    if category == "color_attr":
        s1, s2 = _two_distinct(SHAPES, g)
        c1, c2 = _two_distinct(colors, g)
        return PromptSpec(category, (ObjectSpec(s1, c1), ObjectSpec(s2, c2)))
    if category == "position":
        while True:
            a = ObjectSpec(_choice(SHAPES, g), _choice(colors, g))
            b = ObjectSpec(_choice(SHAPES, g), _choice(colors, g))
            if (a.shape, a.color) != (b.shape, b.color):
                return PromptSpec(category, (a, b), relation=_choice(RELATIONS, g))
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


def sample_specs(n: int, seed: int | torch.Generator, categories: tuple[str, ...] = CATEGORIES) -> list[PromptSpec]:
    """The training prompt sampler: ``n`` specs, categories uniform at random."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return [sample_spec(_choice(categories, g), g) for _ in range(n)]


def eval_prompts(n: int = 96, seed: int = 1234) -> list[PromptSpec]:
    """The fixed evaluation set: ``n`` specs, categories balanced (round-robin), fixed by ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    return [sample_spec(CATEGORIES[i % len(CATEGORIES)], g) for i in range(n)]


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "single_object": ("shape",),
    "colors": ("color", "shape"),
    "two_object": ("shape",),
    "counting": ("count", "shape"),
    "position": ("relation", "color", "shape"),
    "color_attr": ("bind", "color", "shape"),
}


def corrupt_spec(spec: PromptSpec, g: torch.Generator, kind: str | None = None) -> tuple[PromptSpec, str]:
    """A near-miss of ``spec``: a render of it must be judged WRONG against ``spec``'s prompt.

    ``kind`` (random among ``CORRUPTIONS[spec.category]`` when None): ``color`` / ``shape`` change one
    group's attribute, ``count`` changes the count, ``relation`` flips it (swapped positions),
    ``bind`` swaps the colours of the two shapes (attribute binding). Returns ``(spec', kind)``.
    """
    kinds = CORRUPTIONS[spec.category]
    if kind is None:
        kind = _choice(kinds, g)
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds} for category {spec.category!r}, got {kind!r}")
    objs = list(spec.objects)
    for _ in range(100):
        i = int(torch.randint(len(objs), (1,), generator=g))
        o = objs[i]
        new = list(objs)
        relation = spec.relation
        if kind == "shape":
            new[i] = ObjectSpec(_choice(tuple(s for s in SHAPES if s != o.shape), g), o.color, o.count)
        elif kind == "color":
            new[i] = ObjectSpec(o.shape, _choice(tuple(c for c in COLORS if c != o.color), g), o.count)
        elif kind == "count":
            new[i] = ObjectSpec(o.shape, o.color, _choice(tuple(n for n in COUNT_WORDS if n != o.count), g))
        elif kind == "relation":
            relation = _OPPOSITE[spec.relation]
        else:  # bind
            a, b = objs
            new = [ObjectSpec(a.shape, b.color, a.count), ObjectSpec(b.shape, a.color, b.count)]
        try:
            return PromptSpec(spec.category, tuple(new), relation), kind
        except ValueError:  # the change made the two groups indistinguishable: draw again
            continue
    raise RuntimeError(f"could not corrupt {spec.text!r} with kind {kind!r}")


def draw_shape(image: torch.Tensor, shape: str, color: tuple[float, float, float], x: int, y: int, size: int) -> None:
    """Paint ``shape`` in place into ``image [3, H, W]``, hard edges, bounding box at ``(x, y)``."""
    ys = torch.arange(y, y + size, dtype=torch.float32) + 0.5
    xs = torch.arange(x, x + size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = x + size / 2.0, y + size / 2.0
    if shape == "square":
        mask = torch.ones_like(px, dtype=torch.bool)
    elif shape == "circle":
        mask = (px - cx) ** 2 + (py - cy) ** 2 <= (size / 2.0) ** 2
    elif shape == "triangle":  # isosceles, apex up, base on the bottom row
        mask = (px - cx).abs() <= (py - y) / 2.0
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    region = image[:, y : y + size, x : x + size]
    col = torch.tensor(color, dtype=image.dtype).view(3, 1, 1)
    region[:] = torch.where(mask.unsqueeze(0), col, region)


def _size_range(total: int) -> tuple[int, int]:
    return (8, 12) if total <= 2 else (7, 10)


def _relation_ok(a: Placement, b: Placement, relation: str) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay  # offset from a to b; image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 8 and abs(across) <= 0.5 * along


def place_objects(spec: PromptSpec, g: torch.Generator, image_size: int = IMAGE_SIZE, max_tries: int = 2000) -> list[Placement]:
    """Random non-touching placements satisfying ``spec`` (position relations with a clear margin)."""
    colors = tuple(COLORS)
    lo, hi = _size_range(spec.total_objects)
    for _ in range(max_tries):
        placed: list[Placement] = []
        ok = True
        for group in spec.objects:
            for _ in range(group.count):
                size = int(torch.randint(lo, hi + 1, (1,), generator=g))
                x, y = (int(v) for v in torch.randint(1, image_size - size, (2,), generator=g))
                color = group.color if group.color is not None else _choice(colors, g)
                p = Placement(group.shape, color, x, y, size)
                if any(_boxes_close(p, q) for q in placed):
                    ok = False
                    break
                placed.append(p)
            if not ok:
                break
        if ok and (spec.relation is None or _relation_ok(placed[0], placed[1], spec.relation)):
            return placed
    raise RuntimeError(f"could not place {spec.text!r} in {max_tries} tries on a {image_size}px canvas")


def _boxes_close(p: Placement, q: Placement) -> bool:
    return not (
        p.x + p.size + MIN_GAP <= q.x
        or q.x + q.size + MIN_GAP <= p.x
        or p.y + p.size + MIN_GAP <= q.y
        or q.y + q.size + MIN_GAP <= p.y
    )


def render(placements: list[Placement], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[3, H, W]`` float32 image in [0, 1]: background then each placement."""
    image = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).repeat(1, image_size, image_size)
    for p in placements:
        draw_shape(image, p.shape, COLORS[p.color], p.x, p.y, p.size)
    return image


def render_spec(spec: PromptSpec, g: torch.Generator, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """A ground-truth image for ``spec``."""
    return render(place_objects(spec, g, image_size), image_size)


def render_batch(specs: list[PromptSpec], seed: int | torch.Generator, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B, 3, H, W]`` ground-truth renders of ``specs``, deterministic from ``seed``."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.stack([render_spec(s, g, image_size) for s in specs])

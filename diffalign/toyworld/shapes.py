"""The toy world's data: coloured shapes on a plain light background, with captions from a grammar.

An image is ``size x size`` pixels (default 32) with one or two shapes (circle, square, triangle)
in one of six colours, drawn anti-aliased (coverage from a signed distance) on a flat light-grey
background ``BACKGROUND = (0.92, 0.92, 0.92)``. The six colours sit 60 degrees apart in hue (red 0,
yellow 60, green 120, cyan 180, blue 240, magenta 300) with high chroma, so that an oracle can
segment them by hue even after a lossy VAE round trip; mixing a colour with the grey background
keeps its hue, so anti-aliased and blurred edges still classify correctly.

Grammar (``[...]`` optional; ``SIZE`` small|large; ``COLOR`` one of ``COLORS``; ``SHAPE`` one of
``SHAPES``)::

    OBJ      := [SIZE] COLOR SHAPE
    caption  := "a" OBJ [POSITION]                 single object
              | "a" OBJ RELATION "a" OBJ           two objects, different colours
    POSITION := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    RELATION := "left of" | "right of" | "above" | "below"

e.g. "a red circle", "a small blue square at the top", "a red circle left of a green triangle",
"a blue square above a large yellow circle". ``Scene`` is the parsed form: ``Scene.parse(c).caption()
== c`` and ``Scene.parse(s.caption()) == s``. Attributes a caption leaves out (size, position) are
drawn at random when the scene is rendered.

Geometry (in pixels at size 32; everything scales with ``size / 32``): a shape has a half extent
``r`` (small: U(4, 5), large: U(6.5, 7.5)) and fills the box ``[cx-r, cx+r] x [cy-r, cy+r]``:
circle of radius r (fills pi/4 of its box), axis-aligned square (fills all of it), apex-up
isosceles triangle with base 2r and height 2r (fills half of it). Position words place the box
centre at x=8 (left), 24 (right), y=8 (top), 24 (bottom) or the middle, with +-1.5 px jitter; a
relation puts the two objects in the left/right (or top/bottom) slots, never overlapping.

Splits: three colour-shape pairs (``HELD_OUT_PAIRS``) never appear in training, and a fixed 10% of
the two-object combinations (colour, shape, relation, colour, shape; "A left of B" and "B right of
A" count as the same combination) are held out as well. ``prompts("heldout")`` lists captions that
contain a held-out pair or a held-out combination; ``prompts("train")`` the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal

import numpy as np
import torch

COLORS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
"""Colour names, ordered by hue: ``COLORS[i]`` has hue ``60 * i`` degrees."""
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.90, 0.90, 0.10),
    "green": (0.10, 0.80, 0.10),
    "cyan": (0.10, 0.85, 0.85),
    "blue": (0.10, 0.10, 0.90),
    "magenta": (0.85, 0.10, 0.85),
}
BACKGROUND: tuple[float, float, float] = (0.92, 0.92, 0.92)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_AREA: dict[str, float] = {"circle": float(np.pi), "square": 4.0, "triangle": 2.0}
"""Area of each shape in units of ``r**2`` (``r`` = half extent of its bounding box)."""
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (4.0, 5.0), "large": (6.5, 7.5)}
"""Half extent ``r`` in pixels at image size 32, per size word."""
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
"""Colour-shape pairs that never occur in the training split."""
HELD_OUT_COMBO_FRACTION = 0.10
Split = Literal["train", "heldout", "all"]

_REF = 32.0  # geometry constants are in pixels at this image size


@dataclass(frozen=True)
class Obj:
    """One object of a caption: colour, shape and (optionally) size word."""

    color: str
    shape: str
    size: str | None = None

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES} or None")

    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape) if w)


@dataclass(frozen=True)
class Scene:
    """A caption's meaning: one object with an optional position word, or two objects and a relation.

    ``relation`` reads ``objects[0] RELATION objects[1]``. Two objects must differ in colour.
    """

    objects: tuple[Obj, ...]
    position: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {n}")
        if n == 1 and self.relation is not None:
            raise ValueError("a single-object scene cannot have a relation")
        if n == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"a two-object scene needs a relation in {RELATIONS}, got {self.relation!r}")
            if self.position is not None:
                raise ValueError("a two-object scene has a relation, not a position word")
            if self.objects[0].color == self.objects[1].color:
                raise ValueError(f"the two objects must differ in colour, both are {self.objects[0].color}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")

    def caption(self) -> str:
        if len(self.objects) == 1:
            cap = f"a {self.objects[0].phrase()}"
            return f"{cap} {POSITION_PHRASE[self.position]}" if self.position else cap
        a, b = self.objects
        return f"a {a.phrase()} {self.relation} a {b.phrase()}"

    @classmethod
    def parse(cls, caption: str) -> Scene:
        return parse_caption(caption)

    def render(self, rng: np.random.Generator, size: int = 32) -> np.ndarray:
        return render(self, rng, size)


# --------------------------------------------------------------------------------------- parsing

_OBJ = rf"(?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASE.items()}
_SINGLE_RE = re.compile(rf"^an? {_OBJ}(?: ({'|'.join(POSITION_PHRASE.values())}))?$")
_PAIR_RE = re.compile(rf"^an? {_OBJ} ({'|'.join(RELATIONS)}) an? {_OBJ}$")


def parse_caption(caption: str) -> Scene:
    """Turn a grammar caption back into its ``Scene`` (case and extra spaces and a final '.' are ignored).

    Raises ValueError naming the caption when it is not in the toy grammar.
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _SINGLE_RE.match(text)
    if m:
        size, color, shape, phrase = m.groups()
        return Scene((Obj(color, shape, size),), position=_PHRASE_TO_POS[phrase] if phrase else None)
    m = _PAIR_RE.match(text)
    if m:
        s1, c1, h1, rel, s2, c2, h2 = m.groups()
        try:
            return Scene((Obj(c1, h1, s1), Obj(c2, h2, s2)), relation=rel)
        except ValueError as e:
            raise ValueError(f"caption {caption!r}: {e}") from None
    raise ValueError(
        f"caption {caption!r} is not in the toy grammar; expected e.g. 'a small red circle at the top' "
        "or 'a red circle left of a green triangle'"
    )


# ---------------------------------------------------------------------------------------- splits


def _canonical_combo(scene: Scene) -> tuple[str, ...]:
    a, b = scene.objects
    rel = scene.relation
    if rel == "right of":
        a, b, rel = b, a, "left of"
    elif rel == "below":
        a, b, rel = b, a, "above"
    return (a.color, a.shape, str(rel), b.color, b.shape)


def _combo_held_out(combo: tuple[str, ...]) -> bool:
    digest = hashlib.md5("|".join(combo).encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < HELD_OUT_COMBO_FRACTION


def is_heldout(scene: Scene | str) -> bool:
    """True when the scene (or caption) contains a held-out colour-shape pair or relation combination."""
    if isinstance(scene, str):
        scene = parse_caption(scene)
    if any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects):
        return True
    return len(scene.objects) == 2 and _combo_held_out(_canonical_combo(scene))


def in_split(scene: Scene | str, split: Split) -> bool:
    if split == "all":
        return True
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")
    return is_heldout(scene) == (split == "heldout")


@cache
def all_scenes() -> tuple[Scene, ...]:
    """Every scene the grammar can express (10,044), in a fixed order."""
    size_opts = (None, *SIZES)
    objs = [Obj(c, s, z) for z in size_opts for c in COLORS for s in SHAPES]
    singles = [Scene((o,), position=p) for p in (None, *POSITIONS) for o in objs]
    pairs = [
        Scene((a, b), relation=rel) for rel in RELATIONS for a, b in itertools.product(objs, objs) if a.color != b.color
    ]
    return tuple(singles + pairs)


def prompts(split: Split = "train", n: int | None = None, seed: int = 0) -> list[str]:
    """Captions of a split: all of them (fixed order), or ``n`` drawn deterministically by ``seed``.

    With ``n``, half are single-object and half two-object captions (the full list is mostly two-object).
    """
    scenes = [s for s in all_scenes() if in_split(s, split)]
    if n is None:
        return [s.caption() for s in scenes]
    rng = random.Random(seed)
    singles = [s for s in scenes if len(s.objects) == 1]
    pairs = [s for s in scenes if len(s.objects) == 2]
    n1 = min(len(singles), n // 2)
    n2 = min(len(pairs), n - n1)
    chosen = rng.sample(singles, n1) + rng.sample(pairs, n2)
    rng.shuffle(chosen)
    return [s.caption() for s in chosen]


def prompt_mix(split: Split, n: int, two_object: float, seed: int = 0) -> list[str]:
    """``n`` captions of a split of which a fraction ``two_object`` (rounded) are two-object scenes, drawn by
    ``seed`` (``prompts`` draws half and half; the held-out evaluation is 79% two-object scenes)."""
    if not 0 <= two_object <= 1:
        raise ValueError(f"two_object must be a fraction in [0, 1], got {two_object}")
    scenes = [s for s in all_scenes() if in_split(s, split)]
    singles = [s.caption() for s in scenes if len(s.objects) == 1]
    pairs = [s.caption() for s in scenes if len(s.objects) == 2]
    n2 = round(n * two_object)
    if n2 > len(pairs) or n - n2 > len(singles):  # never fewer captions, or another mix, than asked
        raise ValueError(f"prompt_mix: {n} {split} captions with {n2} two-object scenes need {n - n2} one-object and "
                         f"{n2} two-object ones; the split has {len(singles)} and {len(pairs)}")
    rng = random.Random(seed)
    chosen = rng.sample(singles, n - n2) + rng.sample(pairs, n2)
    rng.shuffle(chosen)
    return chosen


def eval_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """The standard held-out evaluation prompts: ``prompts("heldout", n, seed)``."""
    return prompts("heldout", n=n, seed=seed)


# ---------------------------------------------------------------------------------------- sampling


def sample_scene(
    rng: np.random.Generator,
    split: Split = "train",
    p_pair: float = 0.5,
    p_size: float = 0.5,
    p_position: float = 0.7,
) -> Scene:
    """Draw a random scene of the split: two objects with probability ``p_pair``; each object names its
    size with probability ``p_size``; a single object names its position with probability ``p_position``."""
    for _ in range(10_000):
        n = 2 if rng.random() < p_pair else 1
        colors = rng.choice(len(COLORS), size=n, replace=False)
        objs = tuple(
            Obj(
                COLORS[int(c)],
                SHAPES[int(rng.integers(len(SHAPES)))],
                SIZES[int(rng.integers(2))] if rng.random() < p_size else None,
            )
            for c in colors
        )
        if n == 1:
            pos = POSITIONS[int(rng.integers(len(POSITIONS)))] if rng.random() < p_position else None
            scene = Scene(objs, position=pos)
        else:
            scene = Scene(objs, relation=RELATIONS[int(rng.integers(len(RELATIONS)))])
        if in_split(scene, split):
            return scene
    raise RuntimeError(f"could not sample a scene of split {split!r}")  # unreachable in practice


# --------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Placement:
    """A concrete object in an image: colour, shape, bounding-box centre and half extent in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float


_SLOT = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}


def layout(scene: Scene, rng: np.random.Generator, size: int = 32) -> list[Placement]:
    """Draw the unspecified attributes of a scene (sizes, positions, jitter) and return its placements."""
    k = size / _REF

    def radius(o: Obj) -> float:
        word = o.size if o.size is not None else SIZES[int(rng.integers(2))]
        lo, hi = SIZE_RANGE[word]
        return float(rng.uniform(lo, hi)) * k

    def clamp(v: float, r: float) -> float:
        return float(min(max(v, r + 0.5 * k), size - r - 0.5 * k))

    radii = [radius(o) for o in scene.objects]
    jit = 1.5 * k
    if len(scene.objects) == 1:
        (o,), (r,) = scene.objects, radii
        if scene.position is None:
            cx, cy = rng.uniform(r + 0.5 * k, size - r - 0.5 * k, size=2)
        else:
            fx, fy = _SLOT[scene.position]
            cx, cy = fx * size + rng.uniform(-jit, jit), fy * size + rng.uniform(-jit, jit)
        return [Placement(o.color, o.shape, clamp(cx, r), clamp(cy, r), r)]

    a, b = scene.objects
    ra, rb = radii
    horizontal = scene.relation in ("left of", "right of")
    first_low = scene.relation in ("left of", "above")  # objects[0] has the smaller coordinate
    lo_r, hi_r = (ra, rb) if first_low else (rb, ra)
    lo = 0.25 * size + rng.uniform(-jit, jit)
    hi = 0.75 * size + rng.uniform(-jit, jit)
    gap = lo_r + hi_r + 1.0 * k
    if hi - lo < gap:  # push apart symmetrically, then keep inside the image
        mid = (lo + hi) / 2
        lo, hi = mid - gap / 2, mid + gap / 2
    lo, hi = clamp(lo, lo_r), clamp(hi, hi_r)
    shared = rng.uniform(-4 * k, 4 * k)  # the pair shares an offset across the relation axis
    across = [0.5 * size + shared + rng.uniform(-jit, jit) for _ in range(2)]
    along_a, along_b = (lo, hi) if first_low else (hi, lo)
    if horizontal:
        ca = (along_a, clamp(across[0], ra))
        cb = (along_b, clamp(across[1], rb))
    else:
        ca = (clamp(across[0], ra), along_a)
        cb = (clamp(across[1], rb), along_b)
    return [Placement(a.color, a.shape, *ca, ra), Placement(b.color, b.shape, *cb, rb)]


def shape_coverage(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0,1] of a shape at pixel centres ``(xs, ys)`` (a box filter of width 1)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - r
    elif shape == "triangle":  # apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        s5 = np.sqrt(5.0)
        d_base = dy - r
        d_left = (-2.0 * (dx + r) - (dy - r)) / s5
        d_right = (2.0 * (dx - r) - (dy - r)) / s5
        sdf = np.maximum(d_base, np.maximum(d_left, d_right))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sdf, 0.0, 1.0)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def render_placements(placements: list[Placement], size: int = 32) -> np.ndarray:
    """Draw placements over the background: float32 ``[3, size, size]`` in [0, 1]."""
    xs, ys = _grid(size)
    img = np.empty((3, size, size), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for p in placements:
        cov = shape_coverage(p.shape, p.cx, p.cy, p.r, xs, ys).astype(np.float32)
        col = np.asarray(COLOR_RGB[p.color], dtype=np.float32)[:, None, None]
        img += cov[None] * (col - img)
    return img


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render a scene (unspecified attributes drawn from ``rng``): float32 ``[3, size, size]`` in [0, 1]."""
    return render_placements(layout(scene, rng, size), size)


def make_dataset(
    n: int,
    seed: int = 0,
    split: Split = "train",
    size: int = 32,
    dtype: torch.dtype = torch.float32,
    return_scenes: bool = False,
    **sample_kwargs: float,
) -> tuple[torch.Tensor, list[str]] | tuple[torch.Tensor, list[str], list[Scene]]:
    """``n`` random images of a split and their captions, deterministic in ``seed``.

    Returns ``(images, captions)`` (and the scenes with ``return_scenes``): images ``[n, 3, size, size]``,
    float in [0, 1] or ``torch.uint8`` in [0, 255] by ``dtype``. ``sample_kwargs`` go to ``sample_scene``.
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split, **sample_kwargs) for _ in range(n)]
    arr = np.stack([render(s, rng, size) for s in scenes]) if n else np.zeros((0, 3, size, size), np.float32)
    images = torch.from_numpy(arr)
    if dtype == torch.uint8:
        images = (images * 255).round().to(torch.uint8)
    elif dtype.is_floating_point:
        images = images.to(dtype)
    else:
        raise ValueError(f"dtype must be a float dtype or torch.uint8, got {dtype}")
    captions = [s.caption() for s in scenes]
    return (images, captions, scenes) if return_scenes else (images, captions)


def render_captions(captions: list[str], seed: int = 0, size: int = 32) -> torch.Tensor:
    """Render one image per caption (attributes the caption leaves out are drawn from ``seed``): ``[B,3,H,W]``."""
    rng = np.random.default_rng(seed)
    if not captions:
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack([render(parse_caption(c), rng, size) for c in captions]))

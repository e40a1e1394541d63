"""Procedural captioned images: flat shapes on a flat background, drawn with Pillow.

The demo model's whole training set. A `Scene` is one or two shapes, each with a kind (circle,
square, triangle, star), a named colour, a size (small, large) and a position (left, right, top,
bottom, center), on a coloured background. `random_scene` draws one from a `random.Random`, so a
seed fixes the data; `draw` renders it (4x supersampled, so edges are anti-aliased as a camera or a
VAE would see them); `caption` describes it with a small grammar:

    "a large red circle on the left, blue background"
    "a green triangle at the top on a white background"
    "a small yellow star on the right and a purple square on the left, black background"

Words are omitted at random (size, position, background) so that short prompts such as
"a red circle on a blue background" are in the training distribution too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Named colours, well apart in RGB so that a nearest-colour reading of a blurry image is unambiguous
# (closest pair: orange/yellow, ~95 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 50, 190),
    "orange": (250, 135, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
KINDS = ("circle", "square", "triangle", "star")
# Radius of the circumscribing circle, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.19}
# Centre of each named position, (x, y) as fractions of the image side (y down).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Positions that two shapes can take without overlapping.
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

JITTER = 0.03  # +- random offset of a shape's centre, fraction of the side: no two images alike
SCALE_JITTER = 0.1  # +- relative random size change within a named size


@dataclass(frozen=True)
class Shape:
    """One shape: what the caption names, plus the small random offsets that keep images varied."""

    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    dx: float = 0.0  # offset of the centre, fraction of the side
    dy: float = 0.0
    scale: float = 1.0  # multiplies the named size's radius

    def __post_init__(self) -> None:
        for value, allowed in ((self.kind, KINDS), (self.colour, COLOURS), (self.size, SIZES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {sorted(allowed)}")

    def geometry(self, side: float) -> tuple[float, float, float]:
        """(cx, cy, r) in pixels of an image `side` pixels wide."""
        x, y = POSITIONS[self.position]
        return (x + self.dx) * side, (y + self.dy) * side, SIZES[self.size] * self.scale * side


@dataclass(frozen=True)
class Scene:
    """One or two shapes on a background colour."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        if self.background not in COLOURS:
            raise ValueError(f"background {self.background!r} is not one of {sorted(COLOURS)}")
        if any(s.colour == self.background for s in self.shapes):
            raise ValueError("a shape of the background's colour would be invisible")


def outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape of circumradius-like size `r` centred at (cx, cy); circles as 64-gons.

    The square's half-side is 0.9 r and the triangle's (pointing up) spans 2.2 r, so the three
    main kinds look about equally big. Every kind's bounding box is centred on (cx, cy).
    """
    if kind == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    if kind == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        h = 1.1 * r
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "star":  # five points, inner radius 0.45 r, first point up; recentred on its bbox
        pts = [
            (math.sin(i * math.pi / 5) * (r if i % 2 == 0 else 0.45 * r), -math.cos(i * math.pi / 5) * (r if i % 2 == 0 else 0.45 * r))
            for i in range(10)
        ]
        ys = [p[1] for p in pts]
        shift = (max(ys) + min(ys)) / 2
        return [(cx + x, cy + y - shift) for x, y in pts]
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def draw(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Render `scene` as uint8 [size, size, 3]: drawn `supersample` times larger, then box-filtered."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    for shape in scene.shapes:
        pen.polygon(outline(shape.kind, *shape.geometry(big)), fill=COLOURS[shape.colour])
    return np.asarray(image.reduce(supersample) if supersample > 1 else image)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: Shape, *, size: bool = True, position: bool = True) -> str:
    """"a large red circle on the left"; size and position words optional."""
    words = [shape.size] if size else []
    words += [shape.colour, shape.kind]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    return f"{phrase} {PHRASES[shape.position]}" if position else phrase


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Describe `scene`. Without `rng`: the canonical, complete caption (what tests prompt with).

    With `rng`, randomly: drop the size word (30 %), drop a lone shape's position (20 %), drop the
    background (10 %), and say the background as ", X background" or " on a X background".
    """
    keep = (lambda p: rng.random() >= p) if rng is not None else (lambda p: True)
    lone = len(scene.shapes) == 1
    # Two shapes always keep their positions: otherwise the caption would not say which is which.
    parts = [noun_phrase(s, size=keep(0.3), position=keep(0.2) or not lone) for s in scene.shapes]
    text = " and ".join(parts)
    if not keep(0.1):
        return text
    if rng is not None and rng.random() < 0.5:
        return f"{text} on {_article(scene.background)} {scene.background} background"
    return f"{text}, {scene.background} background"


def random_shape(rng: random.Random, position: str, *, size: str | None = None, exclude: Sequence[str] = ()) -> Shape:
    """A random shape at `position` whose colour is none of `exclude`."""
    return Shape(
        kind=rng.choice(KINDS),
        colour=rng.choice([c for c in COLOURS if c not in exclude]),
        size=size or rng.choice(tuple(SIZES)),
        position=position,
        dx=rng.uniform(-JITTER, JITTER),
        dy=rng.uniform(-JITTER, JITTER),
        scale=rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER),
    )


def random_scene(rng: random.Random, two_shape_fraction: float = 0.25) -> Scene:
    """A random scene: one shape, or (with probability `two_shape_fraction`) two at opposite sides."""
    background = rng.choice(tuple(COLOURS))
    if rng.random() >= two_shape_fraction:
        return Scene((random_shape(rng, rng.choice(tuple(POSITIONS)), exclude=[background]),), background)
    first, second = rng.sample(rng.choice(PAIRS), 2)
    big = rng.choice((first, second, None))  # at most one large shape, so the two never touch
    shapes = tuple(
        random_shape(rng, pos, size="large" if pos == big else "small", exclude=[background]) for pos in (first, second)
    )
    return Scene(shapes, background)


def random_batch(rng: random.Random, n: int, size: int = 64, two_shape_fraction: float = 0.25) -> tuple[np.ndarray, list[str]]:
    """`n` random images uint8 [n, size, size, 3] and their randomly worded captions."""
    scenes = [random_scene(rng, two_shape_fraction) for _ in range(n)]
    return np.stack([draw(s, size) for s in scenes]), [caption(s, rng) for s in scenes]

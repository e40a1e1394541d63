"""Read a picture of one flat shape back: background colour, shape colour, where it is, what shape.

The judge of the demo model's adherence tests, so it is simple and is itself tested on images
drawn by `shapes.py`, whose truth is known:

- background: the median colour of the image border, named by the nearest palette colour;
- foreground: pixels farther than `FG_THRESHOLD` from that background colour, largest 4-connected
  component (drops specks of sampling noise), then cut at half its contrast with the background
  (where a blurred edge really is);
- colour: majority vote of the foreground pixels' nearest palette colours ("dominant colour");
- position: the foreground centroid, named by which side of the centre it lies on;
- shape: the foreground cropped to its bounding box and resized to a fixed grid, compared by soft
  IoU with the same crop of each ideal shape. This one number folds in the classic cues: the fill
  ratio of the bounding box (square 1, circle pi/4, triangle 1/2) and which corners are filled
  (none for a circle, the bottom two for a triangle, all four for a square).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldmcli.demo import shapes

FG_THRESHOLD = 45.0  # RGB distance from the background; about half the closest palette pair's distance
# |centroid - 0.5| below this on both axes counts as "center". A triangle's centroid sits 1/3 of its
# half-height below its bounding box's centre, so a large one at the top is still seen at the top.
CENTER_TOLERANCE = 0.12
TEMPLATE_SIDE = 24  # grid the bounding-box crops are compared on

_PALETTE_NAMES = tuple(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)  # [K, 3]


@dataclass(frozen=True)
class Reading:
    """What the analyser sees in one image."""

    background: str  # palette name of the border's median colour
    colour: str | None  # dominant palette colour of the foreground (None: no foreground found)
    centroid: tuple[float, float] | None  # (x, y) of the foreground, fractions of the side
    position: str | None  # the named position the centroid falls in
    shape: str | None  # best-matching kind
    shape_scores: dict[str, float]  # soft IoU with each kind's template
    fill_ratio: float  # foreground area / bounding-box area
    area: float  # foreground area, fraction of the image


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Palette index of each RGB pixel [..., 3] -> [...]."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def colour_name(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(nearest_colours(np.asarray(rgb)))]


def border_colour(image: np.ndarray, width: int = 2) -> np.ndarray:
    """Median RGB of the `width`-pixel frame of the image [H, W, 3]."""
    frame = np.concatenate(
        [image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3), image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)]
    )
    return np.median(frame.astype(np.float32), axis=0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a bool mask (BFS; images here are 64 x 64)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def foreground_mask(image: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """The shape's pixels: first everything clearly off the background, then the half-contrast
    contour of that blob (the true edge of a blurred step, whatever the two colours' contrast)."""
    distance = np.sqrt(((image.astype(np.float32) - background_rgb) ** 2).sum(-1))
    blob = largest_component(distance > FG_THRESHOLD)
    if not blob.any():
        return blob
    contrast = np.percentile(distance[blob], 90)
    return largest_component(distance > max(FG_THRESHOLD, 0.5 * contrast))


def position_name(cx: float, cy: float) -> str:
    """The named position of a centroid: center if close to the middle, else the dominant side."""
    dx, dy = cx - 0.5, cy - 0.5
    if abs(dx) < CENTER_TOLERANCE and abs(dy) < CENTER_TOLERANCE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def core_box(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the rows and columns holding at least 2 mask pixels: a one-pixel spur that
    noise glues to an edge would otherwise stretch the box of a 15-pixel shape by 7 %."""
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]
    if not len(rows) or not len(cols):
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def _crop_to_grid(mask: np.ndarray) -> np.ndarray:
    """Bounding-box crop of a mask, resized (bilinear) to TEMPLATE_SIDE^2, values in [0, 1]."""
    crop = mask[core_box(mask)].astype(np.float32)
    image = Image.fromarray(crop * 255).resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255


@lru_cache(maxsize=None)
def templates() -> dict[str, np.ndarray]:
    """Each kind drawn large and sharp, cropped to its bounding box, on the comparison grid."""
    out = {}
    for kind in shapes.KINDS:
        side = 256
        image = Image.new("L", (side, side), 0)
        ImageDraw.Draw(image).polygon(shapes.outline(kind, side / 2, side / 2, side * 0.4), fill=255)
        out[kind] = _crop_to_grid(np.asarray(image) > 127)
    return out


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Soft IoU (sum of minima / sum of maxima) of the mask's crop with each kind's template."""
    grid = _crop_to_grid(mask)
    return {k: float(np.minimum(grid, t).sum() / np.maximum(grid, t).sum()) for k, t in templates().items()}


def analyse(image: np.ndarray) -> Reading:
    """Read one uint8 [H, W, 3] image of a single shape on a flat background."""
    image = np.asarray(image)
    bg_rgb = border_colour(image)
    background = colour_name(bg_rgb)
    mask = foreground_mask(image, bg_rgb)
    h, w = mask.shape
    if mask.sum() < 4:  # nothing there (or a few noisy pixels)
        return Reading(background, None, None, None, None, {}, 0.0, 0.0)
    votes = np.bincount(nearest_colours(image[mask]), minlength=len(_PALETTE_NAMES))
    votes[_PALETTE_NAMES.index(background)] = 0  # rims blending into the background are not the shape
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    scores = shape_scores(mask)
    return Reading(
        background=background,
        colour=_PALETTE_NAMES[int(votes.argmax())] if votes.any() else None,
        centroid=(float(cx), float(cy)),
        position=position_name(cx, cy),
        shape=max(scores, key=scores.get),
        shape_scores=scores,
        fill_ratio=float(mask[core_box(mask)].mean()),
        area=float(mask.sum() / mask.size),
    )


@dataclass(frozen=True)
class Verdict:
    """Does an image show a single-shape scene's shape? One flag per aspect the tests score."""

    colour: bool  # foreground colour AND background colour as asked
    position: bool
    shape: bool

    @property
    def all(self) -> bool:
        return self.colour and self.position and self.shape


def judge(image: np.ndarray, scene: shapes.Scene) -> Verdict:
    """Compare what `analyse` reads in `image` with the single-shape `scene` it should show."""
    if len(scene.shapes) != 1:
        raise ValueError("judge() scores single-shape scenes")
    want = scene.shapes[0]
    got = analyse(image)
    return Verdict(
        colour=got.colour == want.colour and got.background == scene.background,
        position=got.position == want.position,
        shape=got.shape == want.kind,
    )


# --- adherence of a model -------------------------------------------------------------------------

# The three kinds the tests tell apart (stars are in the training data but not scored).
SCORED_KINDS = ("circle", "square", "triangle")


def adherence_cases(n: int = 15) -> list[shapes.Scene]:
    """A fixed list of single-shape scenes covering colour x shape x position (and backgrounds).

    Case i takes kind i mod 3, position i mod 5 (so all 15 kind/position pairs appear in 15 cases),
    a foreground colour stepping through the palette and a background stepping the other way.
    """
    colours, positions = tuple(shapes.COLOURS), tuple(shapes.POSITIONS)
    cases = []
    for i in range(n):
        colour = colours[i % len(colours)]
        background = colours[(len(colours) - 1 - 3 * i) % len(colours)]
        if background == colour:
            background = colours[(colours.index(colour) + 2) % len(colours)]
        shape = shapes.Shape(SCORED_KINDS[i % 3], colour, "large", positions[i % len(positions)])
        cases.append(shapes.Scene((shape,), background))
    return cases


def adherence(model, cases, seeds, *, cfg_scale: float | None = None, steps: int | None = None,
              sampler: str | None = None, **speed: Any,
              ) -> tuple[dict[str, float], list[tuple[shapes.Scene, int, Verdict, np.ndarray]]]:
    """Generate each case's canonical caption for each seed through `ldmcli.pipeline` and judge it.

    `model` is a loaded `ldmcli.pipeline.StableDiffusion`; None arguments take the defaults recorded
    in the model file; `speed`: request fields of the levers that trade exactness for speed (deep_cache,
    tome). Returns ({"colour", "position", "shape", "all"} -> rate, per-image details).
    """
    from ldmcli.demo import sampling_defaults
    from ldmcli.pipeline import generate
    from ldmcli.request import ImageRequest

    defaults = sampling_defaults(model.path)
    size = model.spec.native_size
    details = []
    for scene in cases:
        request = ImageRequest(
            prompt=shapes.caption(scene),
            width=size,
            height=size,
            steps=steps or defaults["steps"],
            cfg_scale=defaults["cfg_scale"] if cfg_scale is None else cfg_scale,
            sampler=sampler or defaults["sampler"],
            **speed,
        )
        images = generate(model, request, list(seeds)).numpy()
        details += [(scene, seed, judge(image, scene), image) for seed, image in zip(seeds, images)]
    rates = {
        aspect: sum(getattr(v, aspect) for _, _, v, _ in details) / len(details)
        for aspect in ("colour", "position", "shape", "all")
    }
    return rates, details

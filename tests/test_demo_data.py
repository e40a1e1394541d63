"""The demo model's training data and the analyser that judges generated images (no model needed).

The analyser is tested on images drawn by `shapes.py` (known truth), clean and degraded the way
generated images are (blur, noise), so that the model tests in test_demo_model.py can trust it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldmcli.demo import analysis, shapes

# --- the analyser, on ground truth -----------------------------------------------------------------


def _single_shape_scenes(n: int, seed: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        scene = shapes.random_scene(rng, two_shape_fraction=0.0)
        if scene.shapes[0].kind in analysis.SCORED_KINDS:
            scenes.append(scene)
    return scenes


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur + noise: softer edges and speckle, like a small model's samples."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    return np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("degraded", "max_misread"), [(False, 0), (True, 2)], ids=["clean", "blurred+noise"])
def test_analyser_reads_drawn_shapes(degraded: bool, max_misread: int) -> None:
    """Perfect on clean drawings; at most 1 % misread (small squares blurred round) when degraded,
    an error rate far below the model thresholds (10-25 %) the analyser judges."""
    noise = np.random.default_rng(0)
    scenes = _single_shape_scenes(200, seed=7)
    wrong = []
    for scene in scenes:
        image = shapes.draw(scene)
        if degraded:
            image = _degrade(image, noise)
        verdict = analysis.judge(image, scene)
        if not verdict.all:
            wrong.append((shapes.caption(scene), analysis.analyse(image)))
    assert len(wrong) <= max_misread, f"{len(wrong)}/{len(scenes)} misread, e.g. {wrong[:2]}"


def test_analyser_rejects_wrong_claims() -> None:
    """Each aspect fails on its own when the scene claims something else (the judge can say no)."""
    scene = shapes.Scene((shapes.Shape("circle", "red", "large", "left"),), "blue")
    image = shapes.draw(scene)
    assert analysis.judge(image, scene).all
    for changed, aspect in (
        (shapes.Scene((shapes.Shape("circle", "orange", "large", "left"),), "blue"), "colour"),
        (shapes.Scene((shapes.Shape("circle", "red", "large", "left"),), "purple"), "colour"),
        (shapes.Scene((shapes.Shape("circle", "red", "large", "top"),), "blue"), "position"),
        (shapes.Scene((shapes.Shape("square", "red", "large", "left"),), "blue"), "shape"),
        (shapes.Scene((shapes.Shape("triangle", "red", "large", "left"),), "blue"), "shape"),
    ):
        verdict = analysis.judge(image, changed)
        assert not getattr(verdict, aspect), (changed, verdict)
    blank = np.full((64, 64, 3), shapes.COLOURS["blue"], dtype=np.uint8)
    assert not any(vars(analysis.judge(blank, scene)).values())


def test_shape_measures_separate_kinds() -> None:
    """Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2 (the classic cue)."""
    fills = {}
    for kind in analysis.SCORED_KINDS:
        image = shapes.draw(shapes.Scene((shapes.Shape(kind, "white", "large", "center"),), "black"))
        fills[kind] = analysis.analyse(image).fill_ratio
    assert fills["square"] > 0.95 and 0.72 < fills["circle"] < 0.85 and 0.45 < fills["triangle"] < 0.6, fills


def test_captions() -> None:
    scene = shapes.Scene((shapes.Shape("circle", "orange", "large", "left"),), "blue")
    assert shapes.caption(scene) == "a large orange circle on the left, blue background"
    pair = shapes.Scene(
        (shapes.Shape("square", "red", "small", "top"), shapes.Shape("star", "white", "large", "bottom")), "black"
    )
    assert shapes.caption(pair) == "a small red square at the top and a large white star at the bottom, black background"
    rng = random.Random(0)
    worded = {shapes.caption(scene, rng) for _ in range(200)}
    assert "an orange circle on a blue background" in worded  # the README's kind of prompt is in the data
    assert len(worded) > 5
    images, captions = shapes.random_batch(random.Random(3), 4)
    again, captions_again = shapes.random_batch(random.Random(3), 4)
    assert images.shape == (4, 64, 64, 3) and np.array_equal(images, again) and captions == captions_again

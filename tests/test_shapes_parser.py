"""Scene parser: exact inversion of the renderer, robustness to blur/noise, graceful failure on other images."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_recipes.scene_parser import parse_scene, scene_match
from data_recipes.shapes import BACKGROUND, Scene, ShapeObject, render, sample_scene


def _exact_rate(size: int, count: int, seed: int, degrade=None) -> float:
    rng = random.Random(seed)
    hits = 0
    for _ in range(count):
        scene = sample_scene(rng)
        image = render(scene, size)
        if degrade is not None:
            image = degrade(image)
        hits += parse_scene(image) == scene
    return hits / count


def test_parser_recovers_fresh_64px_renders_exactly():
    assert _exact_rate(64, 1000, seed=2024) >= 0.99


@pytest.mark.parametrize(("size", "count"), [(128, 150), (384, 25)])
def test_parser_works_at_other_sizes(size, count):
    assert _exact_rate(size, count, seed=size) >= 0.99


def test_parser_is_robust_to_mild_blur_and_noise():
    noise = np.random.default_rng(0)

    def degrade(image: Image.Image) -> Image.Image:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
        noisy = blurred + noise.normal(0.0, 8.0, blurred.shape)
        return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))

    assert _exact_rate(64, 400, seed=5, degrade=degrade) >= 0.95


def test_blank_and_non_shapes_images_give_partial_scenes_without_raising():
    assert parse_scene(Image.new("RGB", (64, 64), BACKGROUND)) == Scene()
    assert parse_scene(Image.new("RGB", (64, 64), (0, 0, 0))) == Scene()
    noise = np.random.default_rng(1)
    found = [
        len(parse_scene(Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8))))
        for _ in range(10)
    ]
    assert max(found) <= 2  # random pixels are not mistaken for a full scene
    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.float32)[None, :, None], (96, 1, 3))
    assert isinstance(parse_scene(gradient), Scene)
    assert parse_scene(Image.new("L", (5, 5))) == Scene()
    assert isinstance(parse_scene(Image.new("RGBA", (80, 64))), Scene)


def test_parser_accepts_arrays_and_other_modes():
    scene = Scene(
        (ShapeObject("star", "purple", "large", 0, 0), ShapeObject("cross", "orange", "small", 2, 1))
    )
    image = render(scene, 64)
    assert parse_scene(np.asarray(image)) == scene
    assert parse_scene(np.asarray(image, dtype=np.float32) / 255.0) == scene
    assert parse_scene(image.convert("RGBA")) == scene
    with pytest.raises(ValueError, match="image"):
        parse_scene("not an image")


def test_scene_match_counts_objects_and_attributes():
    reference = Scene(
        (ShapeObject("star", "red", "large", 0, 0), ShapeObject("circle", "blue", "small", 1, 1))
    )
    predicted = Scene(
        (ShapeObject("star", "red", "large", 0, 0), ShapeObject("square", "blue", "small", 1, 1),
         ShapeObject("cross", "black", "small", 2, 2))
    )  # fmt: skip
    match = scene_match(predicted, reference)
    assert match["exact"] is False
    assert (match["cells_found"], match["matched_objects"]) == (2, 1)
    assert (match["shape_correct"], match["color_correct"], match["size_correct"]) == (1, 2, 2)
    assert match["precision"] == pytest.approx(1 / 3) and match["recall"] == pytest.approx(1 / 2)
    assert scene_match(reference, reference)["exact"] is True

"""Shapes world: vocabulary, scene dataclasses, sampling and rendering."""

from __future__ import annotations

import itertools
import json
import random
import re

import numpy as np
import pytest

from data_recipes.shapes import (
    ALL_PAIRS,
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    cell_center,
    render,
    sample_scene,
)


def test_vocabulary_is_large_enough_and_colors_are_well_separated():
    assert {"circle", "square", "triangle", "star", "cross"} <= set(SHAPES)
    assert len(COLORS) >= 6 and SIZES == ("small", "large") and len(POSITIONS) == 9
    assert set(POSITIONS.values()) >= {"top left", "center", "bottom right"}
    rgb = {name: np.array(value, dtype=float) for name, value in COLORS.items()}
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 80, (a, b)
    for name, value in rgb.items():
        assert np.linalg.norm(value - np.array(BACKGROUND)) > 150, name


def test_sampling_is_deterministic_by_seed():
    first = [sample_scene(random.Random(7)) for _ in range(3)]
    again = [sample_scene(random.Random(7)) for _ in range(3)]
    assert first == again
    rng_a, rng_b = random.Random(1), random.Random(2)
    assert [sample_scene(rng_a) for _ in range(20)] != [sample_scene(rng_b) for _ in range(20)]
    scene = sample_scene(random.Random(3), n_objects=4)
    assert render(scene).tobytes() == render(scene).tobytes()


def test_scenes_have_one_to_four_objects_in_distinct_cells_from_allowed_pairs():
    rng = random.Random(0)
    allowed = [pair for pair in ALL_PAIRS if pair[0] != "red"]
    counts = set()
    for _ in range(2000):
        scene = sample_scene(rng, allowed_pairs=allowed)
        cells = [obj.cell for obj in scene.objects]
        assert len(cells) == len(set(cells))
        assert 1 <= len(scene) <= 4
        assert all(obj.color != "red" for obj in scene.objects)
        counts.add(len(scene))
    assert counts == {1, 2, 3, 4}
    assert len(sample_scene(rng, n_objects=3)) == 3


def test_scene_dict_round_trip_and_order_independent_equality():
    scene = Scene((ShapeObject("star", "blue", "large", 2, 2), ShapeObject("circle", "red", "small", 0, 1)))
    data = json.loads(json.dumps(scene.to_dict()))
    assert Scene.from_dict(data) == scene
    assert data["objects"][0] == {"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 1}
    assert scene.at(2, 2).shape == "star" and scene.at(1, 1) is None
    assert scene.objects[1].position == "bottom right"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (
            {"objects": [{"shape": "hexagon", "color": "red", "size": "small", "row": 0, "col": 0}]},
            "objects[0].shape",
        ),
        (
            {"objects": [{"shape": "star", "color": "teal", "size": "small", "row": 0, "col": 0}]},
            "objects[0].color",
        ),
        (
            {"objects": [{"shape": "star", "color": "red", "size": "tiny", "row": 0, "col": 0}]},
            "objects[0].size",
        ),
        (
            {"objects": [{"shape": "star", "color": "red", "size": "small", "row": 3, "col": 0}]},
            "objects[0].row",
        ),
        ({"objects": [{"shape": "star", "color": "red", "size": "small", "row": 0}]}, "missing field(s) col"),
        ({"objects": "star"}, "scene.objects: expected a list"),
        ({}, "missing field objects"),
        (
            {
                "objects": [
                    {"shape": "star", "color": "red", "size": "small", "row": 1, "col": 1},
                    {"shape": "square", "color": "blue", "size": "large", "row": 1, "col": 1},
                ]
            },
            "share the grid cell",
        ),
    ],
)
def test_from_dict_rejects_bad_fields_by_name(payload, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Scene.from_dict(payload)


@pytest.mark.parametrize("size", [64, 128, 384])
def test_render_draws_objects_on_the_background_at_any_size(size):
    scene = Scene(
        (ShapeObject("square", "green", "large", 1, 1), ShapeObject("circle", "blue", "small", 0, 2))
    )
    image = render(scene, size)
    assert image.mode == "RGB" and image.size == (size, size)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == BACKGROUND and tuple(pixels[-1, 0]) == BACKGROUND
    for obj in scene.objects:
        x, y = cell_center(obj.row, obj.col, size)
        assert tuple(pixels[int(y), int(x)]) == COLORS[obj.color]


def test_large_shapes_cover_more_pixels_than_small_ones_for_every_shape():
    for shape in SHAPES:
        areas = {}
        for size in SIZES:
            pixels = np.asarray(render(Scene((ShapeObject(shape, "black", size, 1, 1),)), 64)).astype(int)
            areas[size] = int((np.abs(pixels - np.array(BACKGROUND)).sum(axis=2) > 200).sum())
        assert areas["large"] > 2 * areas["small"] > 0, (shape, areas)

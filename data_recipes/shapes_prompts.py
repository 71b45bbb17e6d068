"""GenEval-style text-to-image prompts for the shapes world: `make_prompt` draws a prompt spec of one tag together
with a scene that satisfies it, `prompt_satisfied` is the check the T2I evaluation runs on parsed scenes, and
`validate_spec` names the field of a malformed spec.

Prompt specs follow GenEval's metadata layout: {"prompt", "tag", "include": [{"class", "count", "color"?,
"position"?: [relation, index]}], "exclude": [{"class", "count", "color"?}]}. An include item needs at least
`count` matching objects, an exclude item fewer than `count`; a position item needs one matching object standing in
`relation` ("left of", "right of", "above", "below", on the 3x3 grid) to an object matching include[index].
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from data_recipes.shapes import (
    COLOR_NAMES,
    GRID,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    normalize_pairs,
)
from data_recipes.shapes_text import RELATIONS, TAGS, counted, with_article


def _matches(obj: ShapeObject, item: Mapping[str, Any]) -> bool:
    return obj.shape == item["class"] and ("color" not in item or obj.color == item["color"])


def _related(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row  # "below"


def _check_item(item: Any, where: str, n_include: int | None) -> None:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if item.get("class") not in SHAPES:
        raise ValueError(f"{where}.class: {item.get('class')!r} is not one of {', '.join(SHAPES)}")
    count = item.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{where}.count: expected a non-negative integer, got {count!r}")
    if "color" in item and item["color"] not in COLOR_NAMES:
        raise ValueError(f"{where}.color: {item['color']!r} is not one of {', '.join(COLOR_NAMES)}")
    if "position" in item:
        position = item["position"]
        if n_include is None:
            raise ValueError(f"{where}.position: only include items may carry a position")
        if (
            not isinstance(position, Sequence)
            or isinstance(position, str)
            or len(position) != 2
            or position[0] not in RELATIONS
            or isinstance(position[1], bool)
            or not isinstance(position[1], int)
            or not 0 <= position[1] < n_include
        ):
            raise ValueError(
                f"{where}.position: expected [relation, include index] with relation one of "
                f"{', '.join(RELATIONS)} and index < {n_include}, got {position!r}"
            )


def validate_spec(spec: Any) -> None:
    """Raise ValueError naming the field when `spec` is not a prompt spec that `prompt_satisfied` can check."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"prompt spec: expected an object, got {type(spec).__name__}")
    if spec.get("tag") not in TAGS:
        raise ValueError(f"prompt spec.tag: {spec.get('tag')!r} is not one of {', '.join(TAGS)}")
    include = spec.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("prompt spec.include: expected a non-empty list")
    for index, item in enumerate(include):
        _check_item(item, f"prompt spec.include[{index}]", len(include))
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError("prompt spec.exclude: expected a list")
    for index, item in enumerate(exclude):
        _check_item(item, f"prompt spec.exclude[{index}]", None)


def prompt_satisfied(spec: Mapping[str, Any], scene: Scene) -> bool:
    """Whether `scene` (typically parsed from a generated image) satisfies the prompt spec, GenEval-style."""
    validate_spec(spec)
    objects = scene.objects
    include = spec["include"]
    for item in include:
        if sum(_matches(o, item) for o in objects) < item["count"]:
            return False
    for item in spec.get("exclude", []):
        if sum(_matches(o, item) for o in objects) >= item["count"]:
            return False
    for item in include:
        if "position" in item:
            relation, index = item["position"]
            anchors = [o for o in objects if _matches(o, include[index])]
            movers = [o for o in objects if _matches(o, item)]
            if not any(_related(a, b, relation) and a != b for a in movers for b in anchors):
                return False
    return True


def _pick_pairs(
    rng: random.Random,
    k: int,
    pool: Sequence[tuple[str, str]],
    required: Sequence[tuple[str, str]],
    distinct_shapes: bool = False,
    distinct_colors: bool = False,
) -> list[tuple[str, str]]:
    """k distinct pairs from `pool` (one of them from `required` when given), in random order."""
    chosen: list[tuple[str, str]] = []
    while len(chosen) < k:
        source = required if required and not chosen else pool
        candidates = [
            p
            for p in source
            if p not in chosen
            and not (distinct_shapes and any(p[1] == q[1] for q in chosen))
            and not (distinct_colors and any(p[0] == q[0] for q in chosen))
        ]
        if not candidates:
            raise ValueError(
                f"allowed_pairs: too few (color, shape) pairs to pick {k} that differ as required"
            )
        chosen.append(rng.choice(candidates))
    rng.shuffle(chosen)
    return chosen


def _place(rng: random.Random, pairs: Sequence[tuple[str, str]], cells: Sequence[int]) -> Scene:
    return Scene(
        tuple(
            ShapeObject(shape, color, rng.choice(SIZES), cell // GRID, cell % GRID)
            for (color, shape), cell in zip(pairs, cells)
        )
    )


def _related_cells_ok(a: int, b: int, relation: str) -> bool:
    probe = ShapeObject("circle", "red", "small", a // GRID, a % GRID)
    return _related(probe, ShapeObject("circle", "red", "small", b // GRID, b % GRID), relation)


def _related_cells(rng: random.Random, relation: str) -> tuple[int, int]:
    """Cells (mover, anchor) with the mover standing in `relation` to the anchor."""
    options = [
        (a, b)
        for a in range(GRID * GRID)
        for b in range(GRID * GRID)
        if a != b and _related_cells_ok(a, b, relation)
    ]
    return rng.choice(options)


def make_prompt(
    rng: random.Random,
    tag: str,
    allowed_pairs: Collection[tuple[str, str]] | None = None,
    required_pairs: Collection[tuple[str, str]] | None = None,
) -> tuple[dict[str, Any], Scene]:
    """A prompt spec of GenEval category `tag` and a scene that satisfies it (holding only the prompted objects).

    Objects use `allowed_pairs` (default: all); with `required_pairs`, one prompted object uses one of those
    (used for held-out test prompts).
    """
    if tag not in TAGS:
        raise ValueError(f"tag: {tag!r} is not one of {', '.join(TAGS)}")
    pool = normalize_pairs(allowed_pairs, "allowed_pairs")
    required = normalize_pairs(required_pairs, "required_pairs") if required_pairs is not None else []
    if tag == "single_object":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        spec = {"prompt": with_article(pair[1]), "include": [{"class": pair[1], "count": 1}]}
        scene = _place(rng, [pair], rng.sample(range(GRID * GRID), 1))
    elif tag == "colors":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        spec = {
            "prompt": with_article(f"{pair[0]} {pair[1]}"),
            "include": [{"class": pair[1], "count": 1, "color": pair[0]}],
        }
        scene = _place(rng, [pair], rng.sample(range(GRID * GRID), 1))
    elif tag == "counting":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        count = rng.randint(2, 4)
        spec = {
            "prompt": counted(count, pair[0], pair[1]),
            "include": [{"class": pair[1], "count": count, "color": pair[0]}],
            "exclude": [{"class": pair[1], "count": count + 1, "color": pair[0]}],
        }
        scene = _place(rng, [pair] * count, rng.sample(range(GRID * GRID), count))
    elif tag == "two_object":
        pairs = _pick_pairs(rng, 2, pool, required, distinct_shapes=True)
        spec = {
            "prompt": f"{with_article(pairs[0][1])} and {with_article(pairs[1][1])}",
            "include": [{"class": shape, "count": 1} for _, shape in pairs],
        }
        scene = _place(rng, pairs, rng.sample(range(GRID * GRID), 2))
    elif tag == "color_attr":
        pairs = _pick_pairs(rng, 2, pool, required, distinct_shapes=True, distinct_colors=True)
        spec = {
            "prompt": " and ".join(with_article(f"{color} {shape}") for color, shape in pairs),
            "include": [{"class": shape, "count": 1, "color": color} for color, shape in pairs],
        }
        scene = _place(rng, pairs, rng.sample(range(GRID * GRID), 2))
    else:  # position
        mover, anchor = _pick_pairs(rng, 2, pool, required)
        relation = rng.choice(list(RELATIONS))
        mover_cell, anchor_cell = _related_cells(rng, relation)
        spec = {
            "prompt": f"{with_article(f'{mover[0]} {mover[1]}')} {RELATIONS[relation]} "
            f"{with_article(f'{anchor[0]} {anchor[1]}')}",
            "include": [
                {"class": anchor[1], "count": 1, "color": anchor[0]},
                {"class": mover[1], "count": 1, "color": mover[0], "position": [relation, 0]},
            ],
        }
        scene = _place(rng, [mover, anchor], [mover_cell, anchor_cell])
    spec = {"prompt": spec["prompt"], "tag": tag, **{k: v for k, v in spec.items() if k != "prompt"}}
    spec.setdefault("exclude", [])
    return spec, scene


def spec_pairs(spec: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (color, shape) pairs a prompt spec names explicitly (items without a color name none)."""
    return {(item["color"], item["class"]) for item in spec["include"] if "color" in item}

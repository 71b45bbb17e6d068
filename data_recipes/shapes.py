"""The shapes world: its vocabulary (shapes, colors, sizes, 3x3 positions), scenes, scene sampling and rendering.

A scene is 1-4 colored shapes, each in its own cell of a 3x3 grid, drawn with Pillow on a plain light background.
Rendering is supersampled and box-filtered, so edges are anti-aliased at every image size; the geometry is chosen so
every shape and both sizes stay unambiguous at 64 px (a cell is ~21 px there). Everything is deterministic given a
`random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Well separated in RGB (smallest pairwise distance ~90) and far from the background (>= ~210).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "orange": (245, 130, 15),
    "yellow": (240, 220, 30),
    "green": (40, 160, 60),
    "cyan": (25, 185, 215),
    "blue": (35, 70, 210),
    "purple": (140, 50, 185),
    "black": (35, 35, 35),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of a shape as a fraction of the cell side: at 64 px, small ~10 px across and large ~17 px.
SIZE_RADIUS: dict[str, float] = {"small": 0.24, "large": 0.40}

GRID = 3
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
POSITION_CELLS: dict[str, tuple[int, int]] = {name: cell for cell, name in POSITIONS.items()}

BACKGROUND: tuple[int, int, int] = (245, 244, 238)
MAX_OBJECTS = 4
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((color, shape) for color in COLOR_NAMES for shape in SHAPES)

_OBJECT_FIELDS = ("shape", "color", "size", "row", "col")


def _check_choice(where: str, value: Any, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _check_cell_index(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < GRID:
        raise ValueError(f"{where}: {value!r} is not a grid index 0..{GRID - 1}")


@dataclass(frozen=True)
class ShapeObject:
    """One shape: what it is (shape, color, size) and where it is (grid row and column, 0..2)."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("color", self.color, COLOR_NAMES)
        _check_choice("size", self.size, SIZES)
        _check_cell_index("row", self.row)
        _check_cell_index("col", self.col)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def pair(self) -> tuple[str, str]:
        """The (color, shape) pair, the unit that held-out splits are defined on."""
        return (self.color, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _OBJECT_FIELDS}

    @classmethod
    def from_dict(cls, data: Any, where: str = "object") -> ShapeObject:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [name for name in _OBJECT_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(_OBJECT_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**{name: data[name] for name in _OBJECT_FIELDS})
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None


@dataclass(frozen=True)
class Scene:
    """A set of shapes in distinct grid cells, kept in row-major cell order (so equal scenes compare equal)."""

    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        for index, obj in enumerate(objects):
            if not isinstance(obj, ShapeObject):
                raise ValueError(f"objects[{index}]: expected a ShapeObject, got {type(obj).__name__}")
        cells = [obj.cell for obj in objects]
        if len(set(cells)) != len(cells):
            taken = sorted({cell for cell in cells if cells.count(cell) > 1})
            raise ValueError(f"objects: several objects share the grid cell(s) {taken}")
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda obj: obj.cell)))

    def __len__(self) -> int:
        return len(self.objects)

    def at(self, row: int, col: int) -> ShapeObject | None:
        for obj in self.objects:
            if obj.cell == (row, col):
                return obj
        return None

    def pairs(self) -> set[tuple[str, str]]:
        return {obj.pair for obj in self.objects}

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "scene") -> Scene:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "objects" not in data:
            raise ValueError(f"{where}: missing field objects")
        unknown = sorted(set(data) - {"objects"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        items = data["objects"]
        if not isinstance(items, list):
            raise ValueError(f"{where}.objects: expected a list, got {type(items).__name__}")
        objects = [ShapeObject.from_dict(item, f"{where}.objects[{i}]") for i, item in enumerate(items)]
        try:
            return cls(tuple(objects))
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None


def normalize_pairs(pairs: Collection[tuple[str, str]] | None, where: str = "pairs") -> list[tuple[str, str]]:
    """Validate (color, shape) pairs and return them sorted; None means every pair."""
    if pairs is None:
        return list(ALL_PAIRS)
    result = set()
    for index, pair in enumerate(pairs):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"{where}[{index}]: expected a (color, shape) pair, got {pair!r}")
        color, shape = pair
        _check_choice(f"{where}[{index}] color", color, COLOR_NAMES)
        _check_choice(f"{where}[{index}] shape", shape, SHAPES)
        result.add((color, shape))
    if not result:
        raise ValueError(f"{where}: no (color, shape) pair left to draw from")
    return sorted(result)


def sample_scene(
    rng: random.Random,
    allowed_pairs: Collection[tuple[str, str]] | None = None,
    n_objects: int | None = None,
) -> Scene:
    """A random scene of `n_objects` (default 1-4, uniform) shapes in distinct cells, using only allowed pairs.

    About a third of the objects after the first repeat the shape or the color of an earlier one, so counting
    questions ("how many stars?") have answers above one often enough.
    """
    pairs = normalize_pairs(allowed_pairs, "allowed_pairs")
    if n_objects is None:
        n_objects = rng.randint(1, MAX_OBJECTS)
    if not 0 <= n_objects <= GRID * GRID:
        raise ValueError(f"n_objects: {n_objects} is outside 0..{GRID * GRID}")
    cells = rng.sample(range(GRID * GRID), n_objects)
    objects: list[ShapeObject] = []
    for cell in cells:
        candidates = pairs
        if objects and rng.random() < 0.35:
            anchor = rng.choice(objects)
            related = [p for p in pairs if p[0] == anchor.color or p[1] == anchor.shape]
            candidates = related or pairs
        color, shape = rng.choice(candidates)
        objects.append(ShapeObject(shape, color, rng.choice(SIZES), cell // GRID, cell % GRID))
    return Scene(tuple(objects))


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` in a box [-1, 1]^2 (y down); the circle is drawn as an ellipse instead."""
    if shape == "square":
        return [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if shape == "diamond":
        return [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    if shape == "cross":
        a = 0.34
        return [
            (-a, -1.0), (a, -1.0), (a, -a), (1.0, -a), (1.0, a), (a, a),
            (a, 1.0), (-a, 1.0), (-a, a), (-1.0, a), (-1.0, -a), (-a, -a),
        ]  # fmt: skip
    if shape == "star":
        inner = 0.48
        # A five-pointed star spans y in [-1, cos(36 deg)]; shift it down to center its bounding box.
        shift = (1.0 - math.cos(math.pi / 5)) / 2.0
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle) + shift))
        return points
    raise ValueError(f"shape: {shape!r} is not one of {', '.join(SHAPES)}")


def cell_center(row: int, col: int, size: float) -> tuple[float, float]:
    """Pixel (x, y) of the center of grid cell (row, col) in a `size` x `size` image."""
    cell = size / GRID
    return ((col + 0.5) * cell, (row + 0.5) * cell)


def _supersampling(size: int) -> int:
    return 4 if size <= 128 else 2


def render(scene: Scene, size: int = 64, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image (anti-aliased by supersampling and box filtering)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 3:
        raise ValueError(f"size: expected an integer >= 3 pixels, got {size!r}")
    factor = _supersampling(size)
    canvas_size = size * factor
    canvas = Image.new("RGB", (canvas_size, canvas_size), background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy = cell_center(obj.row, obj.col, canvas_size)
        radius = SIZE_RADIUS[obj.size] * canvas_size / GRID
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon([(cx + radius * x, cy + radius * y) for x, y in _unit_outline(obj.shape)], fill=fill)
    return canvas.reduce(factor) if factor > 1 else canvas

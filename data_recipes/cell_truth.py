"""What each cell of an image's code grid shows, from the scene's exact ground truth: `cell_class_grid` gives every
grid cell a class (0 = background, else 1 + the (color, shape, size) index of the object covering it) and
`scene_from_cell_classes` reads a scene back from such a grid. The understanding and generation ladders use them as
perfect image tokens ("oracle" codes), and the code-entropy diagnostics use them as what a cell should carry.
"""

from __future__ import annotations

from collections import Counter

import torch

from data_recipes.shapes import (
    COLOR_NAMES,
    GRID,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Scene,
    ShapeObject,
    cell_center,
)

NUM_CELL_CLASSES = 1 + len(COLOR_NAMES) * len(SHAPES) * len(SIZES)


def object_class(obj: ShapeObject) -> int:
    """1 + the (color, shape, size) index of `obj`."""
    return (
        1
        + (COLOR_NAMES.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)) * len(SIZES)
        + SIZES.index(obj.size)
    )


def class_attributes(cls: int) -> tuple[str, str, str]:
    """(color, shape, size) of a non-zero cell class."""
    if not 1 <= cls < NUM_CELL_CLASSES:
        raise ValueError(f"cell class must lie in [1, {NUM_CELL_CLASSES}), got {cls}")
    index = cls - 1
    size = SIZES[index % len(SIZES)]
    index //= len(SIZES)
    return COLOR_NAMES[index // len(SHAPES)], SHAPES[index % len(SHAPES)], size


def class_factors(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell classes (any shape; 0 = background) -> (color, shape, size) index tensors, each 0 for background and
    1 + the attribute's index otherwise: the tensor form of `class_attributes`."""
    index = (classes - 1).clamp(min=0)
    size = index % len(SIZES)
    index = index // len(SIZES)
    shape, color = index % len(SHAPES), index // len(SHAPES)
    empty = classes == 0
    return tuple(torch.where(empty, 0, part + 1) for part in (color, shape, size))


def class_from_factors(color: torch.Tensor, shape: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The inverse of `class_factors`: the cell class of 1-based attribute indices, background (0) wherever any of
    them is 0; the tensor form of `object_class`."""
    joint = 1 + ((color - 1) * len(SHAPES) + (shape - 1)) * len(SIZES) + (size - 1)
    return torch.where((color == 0) | (shape == 0) | (size == 0), 0, joint)


def cell_class_grid(scene: Scene, grid: int = 8, size: int = 64) -> torch.Tensor:
    """(grid, grid) cell classes: 0 background, else `object_class` of the object whose bounding box covers the
    cell's centre (with one pixel of slack)."""
    out = torch.zeros(grid, grid, dtype=torch.long)
    patch = size / grid
    for obj in scene.objects:
        cx, cy = cell_center(obj.row, obj.col, size)
        radius = SIZE_RADIUS[obj.size] * size / GRID + 1
        for r in range(grid):
            for c in range(grid):
                px, py = (c + 0.5) * patch, (r + 0.5) * patch
                if abs(px - cx) <= radius and abs(py - cy) <= radius:
                    out[r, c] = object_class(obj)
    return out


def centre_cell_grid(scene: Scene, grid: int = 8, size: int = 64) -> torch.Tensor:
    """(grid, grid) cell classes with each object on the one cell under its centre, the rest background (one
    token per object, as the calibration's cells)."""
    out = torch.zeros(grid, grid, dtype=torch.long)
    for obj in scene.objects:
        x, y = cell_center(obj.row, obj.col, size)
        out[int(y * grid / size), int(x * grid / size)] = object_class(obj)
    return out


def _core_cells(row: int, col: int, grid: int, size: int) -> list[tuple[int, int]]:
    """Grid cells whose centres lie inside every object drawn at layout slot (row, col) (the small size's box)."""
    cx, cy = cell_center(row, col, size)
    reach = SIZE_RADIUS["small"] * size / GRID + 1
    patch = size / grid
    return [
        (r, c)
        for r in range(grid)
        for c in range(grid)
        if abs((c + 0.5) * patch - cx) <= reach and abs((r + 0.5) * patch - cy) <= reach
    ]


def scene_from_cell_classes(classes: torch.Tensor, size: int = 64) -> Scene:
    """The scene a (grid, grid) class grid shows: a layout slot holds an object when one of its core cells (those
    every object at that slot covers) is non-zero, with the most common non-zero class there. Cells outside the
    cores are not read."""
    if classes.dim() != 2 or classes.shape[0] != classes.shape[1]:
        raise ValueError(
            f"scene_from_cell_classes: expected a square (grid, grid) tensor, got {tuple(classes.shape)}"
        )
    grid = classes.shape[0]
    objects = []
    for row in range(GRID):
        for col in range(GRID):
            values = [int(classes[r, c]) for r, c in _core_cells(row, col, grid, size)]
            found = Counter(v for v in values if 0 < v < NUM_CELL_CLASSES)
            if found:
                color, shape, object_size = class_attributes(found.most_common(1)[0][0])
                objects.append(ShapeObject(shape=shape, color=color, size=object_size, row=row, col=col))
    return Scene(objects=objects)

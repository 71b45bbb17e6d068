"""Parse a shapes-world image back into a `Scene` (the inverse of `shapes.render`), and compare scenes.

Per grid cell: pixels far from the (estimated) background are the object; its color is the palette color nearest
to the mean of its most saturated pixels; its shape and size come from matching a scale-normalized silhouette
(sampled over the object's bounding box) and its area against templates rendered at the same image size. The
silhouette is thresholded at half contrast toward the object's palette color, which keeps areas and outlines
stable under blur and noise. Works on any image: cells with nothing shape-like are left empty, so a blank,
noisy or unrelated image yields a partial (often empty) scene instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from data_recipes.shapes import (
    BACKGROUND,
    COLOR_NAMES,
    COLORS,
    GRID,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    render,
)

_PALETTE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float32)
_MIN_CONTRAST = float(np.linalg.norm(_PALETTE - np.array(BACKGROUND, dtype=np.float32), axis=1).min())


@dataclass(frozen=True)
class ParserSettings:
    """Thresholds of the parser (fractions are relative to the quantity named)."""

    strong_contrast: float = 0.45  # a pixel is "object" when its distance to the background exceeds this x
    # the weakest palette contrast (yellow vs background)
    min_area_fraction: float = 0.3  # of the smallest template area: fewer strong pixels means an empty cell
    descriptor_side: int = 12  # the silhouette is resampled to side x side over its bounding box
    max_descriptor_error: float = 0.2  # mean absolute silhouette difference above which a cell is left empty
    max_color_spread: float = (
        50.0  # per-channel std of the object's core pixels above which it is not one color
    )
    min_component_share: float = 0.6  # the object must be one connected blob holding this share of its pixels
    min_color_mix: float = 0.35  # lightest blend of a palette color with the background still read as it
    area_weight: float = 0.25  # weight of |log(area / template area)| in the (shape, size) score
    smallest_side: int = 12  # images smaller than this (either side) parse to an empty scene
    max_side: int = 512  # larger images are first downscaled to this side
    template_blurs: tuple[float, ...] = (
        0.0,
        0.035,
        0.06,
    )  # Gaussian blur radii of the templates (x cell side)


DEFAULT_SETTINGS = ParserSettings()


@dataclass(frozen=True)
class _Templates:
    """The silhouette templates of one grid cell, stacked: row i is (shapes[i], sizes[i]) at one blur level."""

    shapes: tuple[str, ...]
    sizes: tuple[str, ...]
    descriptors: np.ndarray  # (T, side * side) silhouettes in [0, 1]
    log_areas: np.ndarray  # (T,)


def _cell_bounds(length: int) -> list[tuple[int, int]]:
    edges = [round(i * length / GRID) for i in range(GRID + 1)]
    return [(edges[i], edges[i + 1]) for i in range(GRID)]


def _to_array(image: Any) -> np.ndarray:
    """An (H, W, 3) float32 RGB array from a PIL image or an (H, W[, C]) uint8/float array."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() else image.convert("RGB")
        return np.asarray(image, dtype=np.float32)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "buif":
            raise ValueError(f"image: expected a numeric array, got dtype {image.dtype}")
        array = image.astype(np.float32)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"image: expected an (H, W, 3) array, got shape {image.shape}")
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        array = array[:, :, :3]
        array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
        if image.dtype.kind == "f" and array.size and float(array.max()) <= 1.0:
            array = array * 255.0  # floats in [0, 1]
        return array
    raise ValueError(f"image: expected a PIL image or a numpy array, got {type(image).__name__}")


def _working_square(array: np.ndarray, max_side: int) -> np.ndarray:
    """Resize to a square of at most `max_side` pixels when needed (scenes are square; other shapes are best
    effort, and very large images would only make the templates slow to build)."""
    height, width = array.shape[:2]
    side = min(max(height, width), max_side)
    if height == width == side:
        return array
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.float32)


def _silhouette(soft: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, float, float] | None:
    """Descriptor (bounding-box-normalized soft silhouette), pixel area and share of `mask` of its largest
    connected component; None when `mask` is empty."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        component = labels == int(sizes.argmax())
    else:
        component = labels == 1
    area = float(component.sum())
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    y0, y1 = rows[0] - 0.5, rows[-1] + 0.5
    x0, x1 = cols[0] - 0.5, cols[-1] + 0.5
    steps = (np.arange(side, dtype=np.float32) + 0.5) / side
    ys = y0 + steps * (y1 - y0)
    xs = x0 + steps * (x1 - x0)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    values = ndimage.map_coordinates(
        np.clip(soft, 0.0, 1.0), [grid_y.ravel(), grid_x.ravel()], order=1, mode="nearest"
    )
    return values.astype(np.float32), area, area / float(mask.sum())


def _soft_map(cell: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Per pixel, how far it lies from the background toward `color` (0 = background, 1 = the color)."""
    direction = color - background
    return ((cell - background) @ direction) / float(direction @ direction)


@lru_cache(maxsize=16)
def _templates(side_px: int, settings: ParserSettings) -> dict[tuple[int, int], _Templates]:
    """Templates of every (shape, size) for every cell of a `side_px` image, from renders at each blur level."""
    background = np.array(BACKGROUND, dtype=np.float32)
    color = np.array(COLORS["black"], dtype=np.float32)
    bounds = _cell_bounds(side_px)
    cells = [(row, col) for row in range(GRID) for col in range(GRID)]
    found: dict[tuple[int, int], list[tuple[str, str, np.ndarray, float]]] = {cell: [] for cell in cells}
    for shape in SHAPES:
        for size in SIZES:
            clean = render(Scene(tuple(ShapeObject(shape, "black", size, r, c) for r, c in cells)), side_px)
            for blur in settings.template_blurs:
                image = clean.filter(ImageFilter.GaussianBlur(blur * side_px / GRID)) if blur > 0 else clean
                array = np.asarray(image, dtype=np.float32)
                for cell in cells:
                    (y0, y1), (x0, x1) = bounds[cell[0]], bounds[cell[1]]
                    soft = _soft_map(array[y0:y1, x0:x1], background, color)
                    silhouette = _silhouette(soft, soft > 0.5, settings.descriptor_side)
                    if silhouette is not None:  # None: the image is too small to hold this shape at all
                        found[cell].append((shape, size, silhouette[0], float(np.log(silhouette[1]))))
    result = {}
    for cell, items in found.items():
        result[cell] = _Templates(
            shapes=tuple(item[0] for item in items),
            sizes=tuple(item[1] for item in items),
            descriptors=np.stack([item[2] for item in items]) if items else np.zeros((0, 1), np.float32),
            log_areas=np.array([item[3] for item in items], dtype=np.float32),
        )
    return result


def _nearest_color(mean_rgb: np.ndarray, background: np.ndarray, min_mix: float) -> int:
    """The palette color c for which background + a * (c - background), a in [min_mix, 1], best explains
    `mean_rgb` (blur mixes an object's color with the background, so a lighter shade still finds its color)."""
    offset = mean_rgb - background
    directions = _PALETTE - background
    mix = np.clip((directions @ offset) / np.einsum("ij,ij->i", directions, directions), min_mix, 1.0)
    return int(np.argmin(np.linalg.norm(offset - mix[:, None] * directions, axis=1)))


def _parse_cell(
    cell: np.ndarray,
    contrast: np.ndarray,
    background: np.ndarray,
    templates: _Templates,
    settings: ParserSettings,
) -> tuple[str, str, str] | None:
    if not templates.shapes:
        return None
    strong = contrast > settings.strong_contrast * _MIN_CONTRAST
    strong_count = int(strong.sum())
    if strong_count < max(settings.min_area_fraction * float(np.exp(templates.log_areas.min())), 2.0):
        return None
    core_pixels = cell[strong & (contrast >= np.median(contrast[strong]))]
    if float(core_pixels.std(axis=0).mean()) > settings.max_color_spread:
        return None
    color_index = _nearest_color(core_pixels.mean(axis=0), background, settings.min_color_mix)
    soft = _soft_map(cell, background, _PALETTE[color_index])
    silhouette = _silhouette(soft, soft > 0.5, settings.descriptor_side)
    if silhouette is None:
        return None
    descriptor, area, share = silhouette
    if share < settings.min_component_share:
        return None
    errors = np.abs(templates.descriptors - descriptor).mean(axis=1)
    scores = errors + settings.area_weight * np.abs(np.log(area) - templates.log_areas)
    best = int(np.argmin(scores))
    if errors[best] > settings.max_descriptor_error:
        return None
    return templates.shapes[best], COLOR_NAMES[color_index], templates.sizes[best]


def parse_scene(image: Any, settings: ParserSettings = DEFAULT_SETTINGS) -> Scene:
    """Recover the scene drawn in `image` (a PIL image or an HxWx3 array); never raises on image content."""
    array = _to_array(image)
    if array.ndim != 3 or min(array.shape[:2]) < settings.smallest_side:
        return Scene()
    array = _working_square(array, settings.max_side)
    side = array.shape[0]
    background = np.median(array.reshape(-1, 3), axis=0).astype(np.float32)
    contrast = np.linalg.norm(array - background, axis=2)
    templates = _templates(side, settings)
    bounds = _cell_bounds(side)
    objects = []
    for row in range(GRID):
        for col in range(GRID):
            (y0, y1), (x0, x1) = bounds[row], bounds[col]
            found = _parse_cell(
                array[y0:y1, x0:x1], contrast[y0:y1, x0:x1], background, templates[(row, col)], settings
            )
            if found is not None:
                shape, color, size = found
                objects.append(ShapeObject(shape, color, size, row, col))
    return Scene(tuple(objects))


def scene_match(predicted: Scene, reference: Scene) -> dict[str, Any]:
    """Compare a parsed scene with a reference: exact match, per-object and per-attribute agreement counts.

    An object "matches" when the same cell holds the same shape, color and size in both scenes; attribute counts
    are over the cells occupied in both.
    """
    predicted_cells = {obj.cell: obj for obj in predicted.objects}
    reference_cells = {obj.cell: obj for obj in reference.objects}
    shared = sorted(set(predicted_cells) & set(reference_cells))
    matched = sum(predicted_cells[cell] == reference_cells[cell] for cell in shared)
    return {
        "exact": predicted == reference,
        "predicted_objects": len(predicted_cells),
        "reference_objects": len(reference_cells),
        "cells_found": len(shared),
        "matched_objects": matched,
        "shape_correct": sum(predicted_cells[c].shape == reference_cells[c].shape for c in shared),
        "color_correct": sum(predicted_cells[c].color == reference_cells[c].color for c in shared),
        "size_correct": sum(predicted_cells[c].size == reference_cells[c].size for c in shared),
        "precision": matched / len(predicted_cells) if predicted_cells else float(not reference_cells),
        "recall": matched / len(reference_cells) if reference_cells else float(not predicted_cells),
    }

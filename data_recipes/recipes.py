"""Data recipes: a small YAML/JSON file naming sources, weights and splits, and the one mixed stream it defines.

    name: shapes_tiny
    seed: 0
    splits:
      train:
        - {name: chat, kind: llava, path: "${DATA}/train/llava.json", weight: 0.5, task: understanding}
        - {name: draw, kind: prompts, path: "${DATA}/train/prompts.jsonl", weight: 0.5, task: t2i}

A source's `kind` is a loader of `data_recipes.loaders` (llava, coco_captions, vqav2, prompts, image_folder,
webdataset); `path` is relative to the recipe file unless absolute, and `${DATA}` stands for the data root the
caller passes (`load_recipe(path, root=...)`; quote such paths inside YAML flow mappings {...}). Optional per
source: `task` (what its samples train: understanding, t2i or image; default by kind), `image_root`, and for
vqav2 `annotations` and `image_pattern`.

`MixedStream` draws sources by weight with a seeded RNG and walks each source through a seeded permutation of its
records, a new one each epoch. Every draw is a pure function of (seed, step) and of (seed, source, epoch), so the
state is a few integers: `state_dict()` / `load_state_dict()` resume with exactly the samples an uninterrupted
stream would have produced.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_recipes.image_io import DEFAULT_MAX_PIXELS
from data_recipes.loaders import LOADERS, open_loader
from data_recipes.loaders.base import Loader, OnBadSample, SkipCounter

RECIPES_DIR = Path(__file__).with_name("recipes")
TASKS: tuple[str, ...] = ("understanding", "t2i", "image")
DEFAULT_TASK: dict[str, str] = {
    "llava": "understanding",
    "coco_captions": "understanding",
    "vqav2": "understanding",
    "prompts": "t2i",
    "webdataset": "t2i",
    "image_folder": "image",
}
ALLOWED_TASKS: dict[str, tuple[str, ...]] = {
    "llava": ("understanding",),
    "coco_captions": ("understanding", "t2i"),
    "vqav2": ("understanding",),
    "prompts": ("t2i",),
    "webdataset": ("understanding", "t2i"),
    "image_folder": ("image",),
}
SOURCE_FIELDS: tuple[str, ...] = (
    "name",
    "kind",
    "path",
    "weight",
    "task",
    "image_root",
    "annotations",
    "image_pattern",
)
RECIPE_FIELDS: tuple[str, ...] = ("name", "seed", "splits", "description")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
STATE_VERSION = 1


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe file and the field."""

    def __init__(self, path: str | os.PathLike, field_name: str | None, reason: str) -> None:
        self.path = str(path)
        self.field = field_name
        self.reason = reason
        super().__init__(f"{self.path}: {field_name}: {reason}" if field_name else f"{self.path}: {reason}")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a split: where the records are, how much of the mixture they make, what they train."""

    name: str
    kind: str
    path: Path
    weight: float
    task: str
    image_root: Path | None = None
    annotations: Path | None = None
    image_pattern: str | None = None

    def loader(
        self,
        on_bad_sample: OnBadSample = "error",
        check_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        skips: SkipCounter | None = None,
    ) -> Loader:
        """The `data_recipes.loaders` loader of this source."""
        options: dict[str, Any] = {
            "on_bad_sample": on_bad_sample,
            "check_images": check_images,
            "max_pixels": max_pixels,
            "skips": skips,
        }
        if self.kind in ("llava", "coco_captions", "prompts", "vqav2") and self.image_root is not None:
            options["image_root"] = self.image_root
        if self.kind == "vqav2":
            options["annotations"] = self.annotations
            options["image_pattern"] = self.image_pattern
        if self.kind == "webdataset":
            options["keep_image_bytes"] = False  # random access by offset: records stay small
        return open_loader(self.kind, self.path, **options)


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    seed: int
    splits: dict[str, tuple[SourceSpec, ...]]
    description: str = ""

    def sources(self, split: str) -> tuple[SourceSpec, ...]:
        if split not in self.splits:
            raise RecipeError(
                self.path, "splits", f"no split {split!r}; expected one of {sorted(self.splits)}"
            )
        return self.splits[split]

    def stream(
        self,
        split: str = "train",
        *,
        seed: int | None = None,
        on_bad_sample: OnBadSample = "error",
        check_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        skips: SkipCounter | None = None,
    ) -> MixedStream:
        """Load every source of `split` and mix them (seed: the recipe's unless given). Skips of all sources go
        to `skips` (or the stream's own counter, `stream.skips`)."""
        skips = skips if skips is not None else SkipCounter()
        sources = []
        for spec in self.sources(split):
            records = spec.loader(on_bad_sample, check_images, max_pixels, skips).load()
            sources.append(StreamSource(spec.name, spec.task, spec.weight, records))
        stream = MixedStream(sources, self.seed if seed is None else seed)
        stream.skips = skips
        return stream


def builtin_recipe(name: str) -> Path:
    """The path of a recipe shipped in data_recipes/recipes/ (e.g. "shapes_tiny")."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"recipe: no built-in recipe {name!r}; expected one of {available}")
    return path


def _substitute(value: str, variables: Mapping[str, str], recipe: Path, field_name: str) -> str:
    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in variables:
            hint = " (pass the data root: load_recipe(path, root=...))" if key == "DATA" else ""
            raise RecipeError(recipe, field_name, f"uses ${{{key}}} but no value was given{hint}")
        return variables[key]

    return _VARIABLE.sub(replace, value)


def _path_field(raw: object, recipe: Path, field_name: str, variables: Mapping[str, str]) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise RecipeError(recipe, field_name, f"expected a path string, got {raw!r}")
    path = Path(os.path.expanduser(_substitute(raw, variables, recipe, field_name)))
    return path if path.is_absolute() else recipe.parent / path


def _optional_path(raw: object, recipe: Path, field_name: str, variables: Mapping[str, str]) -> Path | None:
    return None if raw is None else _path_field(raw, recipe, field_name, variables)


def _parse_source(entry: object, recipe: Path, where: str, variables: Mapping[str, str]) -> SourceSpec:
    if not isinstance(entry, dict):
        raise RecipeError(recipe, where, f"expected a mapping with kind, path and weight, got {entry!r}")
    unknown = sorted(set(entry) - set(SOURCE_FIELDS))
    if unknown:
        raise RecipeError(recipe, f"{where}.{unknown[0]}", f"unknown field; expected one of {SOURCE_FIELDS}")
    kind = entry.get("kind")
    if kind not in LOADERS:
        raise RecipeError(recipe, f"{where}.kind", f"expected one of {sorted(LOADERS)}, got {kind!r}")
    if "path" not in entry:
        raise RecipeError(
            recipe, f"{where}.path", "missing; expected the source's file (or shards, or folder)"
        )
    path = _path_field(entry["path"], recipe, f"{where}.path", variables)
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
        raise RecipeError(recipe, f"{where}.weight", f"expected a finite number >= 0, got {weight!r}")
    task = entry.get("task", DEFAULT_TASK[kind])
    if task not in ALLOWED_TASKS[kind]:
        raise RecipeError(
            recipe, f"{where}.task", f"a {kind} source can train {ALLOWED_TASKS[kind]}, got {task!r}"
        )
    name = entry.get("name", f"{kind}:{Path(str(entry['path'])).name}")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(recipe, f"{where}.name", f"expected a non-empty string, got {name!r}")
    image_root, annotations, image_pattern = (
        entry.get(key) for key in ("image_root", "annotations", "image_pattern")
    )
    if kind == "vqav2":
        if not isinstance(image_pattern, str) or "{image_id" not in image_pattern:
            raise RecipeError(
                recipe,
                f"{where}.image_pattern",
                f"a vqav2 source needs a format string over {{image_id}}, got {image_pattern!r}",
            )
    else:
        for key in ("annotations", "image_pattern"):
            if entry.get(key) is not None:
                raise RecipeError(recipe, f"{where}.{key}", f"only vqav2 sources take this field, not {kind}")
    if image_root is not None and kind in ("image_folder", "webdataset"):
        raise RecipeError(recipe, f"{where}.image_root", f"a {kind} source holds its images itself")
    return SourceSpec(
        name=name,
        kind=kind,
        path=path,
        weight=float(weight),
        task=task,
        image_root=_optional_path(image_root, recipe, f"{where}.image_root", variables),
        annotations=_optional_path(annotations, recipe, f"{where}.annotations", variables),
        image_pattern=image_pattern,
    )


def load_recipe(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Recipe:
    """Read and check a recipe (YAML, or JSON which YAML also reads). `root` is the value of `${DATA}`."""
    recipe_path = Path(path)
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(recipe_path, None, f"cannot read the recipe ({exc})") from exc
    try:
        data = json.loads(text) if recipe_path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(
            recipe_path, None, f"not valid {'JSON' if recipe_path.suffix == '.json' else 'YAML'} ({exc})"
        ) from exc
    if not isinstance(data, dict):
        raise RecipeError(recipe_path, None, f"expected a mapping with 'splits', got {type(data).__name__}")
    unknown = sorted(set(data) - set(RECIPE_FIELDS))
    if unknown:
        raise RecipeError(recipe_path, unknown[0], f"unknown field; expected one of {RECIPE_FIELDS}")
    variables = {"DATA": str(Path(root).expanduser().absolute())} if root is not None else {}
    name = data.get("name", recipe_path.stem)
    if not isinstance(name, str) or not name:
        raise RecipeError(recipe_path, "name", f"expected a non-empty string, got {name!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecipeError(recipe_path, "seed", f"expected an integer >= 0, got {seed!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(recipe_path, "description", f"expected a string, got {description!r}")
    raw_splits = data.get("splits")
    if not isinstance(raw_splits, dict) or not raw_splits:
        raise RecipeError(
            recipe_path,
            "splits",
            f"expected a mapping of split name to a list of sources, got {raw_splits!r}",
        )
    splits: dict[str, tuple[SourceSpec, ...]] = {}
    for split, entries in raw_splits.items():
        if not isinstance(split, str) or not split:
            raise RecipeError(recipe_path, "splits", f"split names must be strings, got {split!r}")
        if not isinstance(entries, list) or not entries:
            raise RecipeError(
                recipe_path, f"splits.{split}", f"expected a non-empty list of sources, got {entries!r}"
            )
        specs = tuple(
            _parse_source(entry, recipe_path, f"splits.{split}[{index}]", variables)
            for index, entry in enumerate(entries)
        )
        names = [spec.name for spec in specs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise RecipeError(
                recipe_path,
                f"splits.{split}",
                f"source name {duplicate!r} is used twice; names must be unique",
            )
        if not sum(spec.weight for spec in specs) > 0:
            raise RecipeError(
                recipe_path, f"splits.{split}", "all weights are 0; expected at least one positive weight"
            )
        splits[split] = specs
    return Recipe(name=name, path=recipe_path, seed=seed, splits=splits, description=description)


# --- the mixed stream -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSource:
    """Records of one source (any indexable sequence) with its mixture weight and task."""

    name: str
    task: str
    weight: float
    records: Sequence[Any] = field(repr=False)


@dataclass(frozen=True)
class MixedSample:
    """One draw of the mixture: the record, which source and task it came from, and where in the stream."""

    step: int
    source: str
    task: str
    record: Any
    epoch: int
    index: int  # the record's index in its source


@dataclass
class _Cursor:
    epoch: int = 0
    position: int = 0
    order: np.ndarray | None = None


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


class MixedStream:
    """An endless, seeded, resumable mixture of sources (iterate it, or call `take(n)`)."""

    def __init__(self, sources: Sequence[StreamSource], seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        for source in sources:
            if not source.weight >= 0:
                raise ValueError(f"source {source.name}: weight must be >= 0, got {source.weight}")
            if source.weight > 0 and len(source.records) == 0:
                raise ValueError(
                    f"source {source.name}: no records (all skipped or an empty file) but weight {source.weight}"
                )
        self.sources = tuple(source for source in sources if source.weight > 0)
        if not self.sources:
            raise ValueError("sources: expected at least one source with a positive weight")
        self.seed = seed
        total = sum(source.weight for source in self.sources)
        self.probabilities = {source.name: source.weight / total for source in self.sources}
        self._cumulative = list(np.cumsum([source.weight / total for source in self.sources]))
        self._cumulative[-1] = 1.0
        self.step = 0
        self._cursors = {source.name: _Cursor() for source in self.sources}
        self.skips: SkipCounter | None = None

    def __iter__(self) -> Iterator[MixedSample]:
        return self

    def __next__(self) -> MixedSample:
        draw = random.Random(f"mix:{self.seed}:{self.step}").random()
        source = self.sources[min(bisect.bisect_right(self._cumulative, draw), len(self.sources) - 1)]
        cursor = self._cursors[source.name]
        if cursor.position >= len(source.records):
            cursor.epoch, cursor.position, cursor.order = cursor.epoch + 1, 0, None
        if cursor.order is None:
            cursor.order = self._order(source, cursor.epoch)
        index = int(cursor.order[cursor.position])
        sample = MixedSample(self.step, source.name, source.task, source.records[index], cursor.epoch, index)
        cursor.position += 1
        self.step += 1
        return sample

    def take(self, count: int) -> list[MixedSample]:
        return [next(self) for _ in range(count)]

    def _order(self, source: StreamSource, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _name_key(source.name), epoch])
        return rng.permutation(len(source.records))

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream (JSON-serializable)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "step": self.step,
            "sources": {
                source.name: {
                    "epoch": self._cursors[source.name].epoch,
                    "position": self._cursors[source.name].position,
                    "size": len(source.records),
                    "weight": source.weight,
                }
                for source in self.sources
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; the sources must be the ones it was saved with (names, sizes, weights)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state: version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("seed") != self.seed:
            raise ValueError(
                f"stream state: saved with seed {state.get('seed')}, this stream has seed {self.seed}"
            )
        saved = state.get("sources", {})
        if sorted(saved) != sorted(self._cursors):
            raise ValueError(
                f"stream state: saved with sources {sorted(saved)}, this stream has {sorted(self._cursors)}"
            )
        for source in self.sources:
            entry = saved[source.name]
            if entry["size"] != len(source.records) or entry["weight"] != source.weight:
                raise ValueError(
                    f"stream state: source {source.name} was saved with {entry['size']} records at weight "
                    f"{entry['weight']}, now has {len(source.records)} at weight {source.weight}"
                )
        for source in self.sources:
            entry = saved[source.name]
            self._cursors[source.name] = _Cursor(int(entry["epoch"]), int(entry["position"]))
        self.step = int(state["step"])

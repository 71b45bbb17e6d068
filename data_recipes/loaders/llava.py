"""The LLaVA conversation loader (`LlavaLoader`): a JSON list of records with an image and human/gpt turns."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from data_recipes.image_io import (
    DEFAULT_MAX_PIXELS,
    load_image,
)
from data_recipes.loaders.base import DataError, Loader
from data_recipes.loaders.fields import _expected, _int_id, _nonempty_str, _read_json, _resolve

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES: tuple[str, ...] = ("human", "gpt", "system")

# --- LLaVA conversations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt" | "system"
    value: str


@dataclass(frozen=True)
class LlavaRecord:
    """A LLaVA conversation; `<image>` placeholders in the turns match `image_paths` one to one, in order."""

    id: str
    image_paths: tuple[Path, ...]
    conversations: tuple[Turn, ...]
    source: Path

    @property
    def image_path(self) -> Path | None:
        return self.image_paths[0] if self.image_paths else None

    def load_images(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
        return [load_image(path, max_pixels=max_pixels) for path in self.image_paths]


class LlavaLoader(Loader):
    """LLaVA conversation JSON: a list of {"id", "image": path | [paths] (optional), "conversations":
    [{"from": "human"|"gpt"|"system", "value": str}, ...]}. Turns alternate human/gpt after an optional leading
    system turn, answers are non-empty, ids unique, and the `<image>` count equals the number of images.
    A record without "id" is named "#<index in the file>"."""

    def __init__(
        self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, **options: Any
    ):
        super().__init__(**options)
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def _records(self) -> Iterator[LlavaRecord | DataError]:
        data = _read_json(self.path, "LLaVA conversation")
        if not isinstance(data, list):
            reason = f"expected a JSON list of conversations, got {type(data).__name__}"
            raise DataError(self.path, None, reason, "wrong_type")
        seen: set[str] = set()
        for index, entry in enumerate(data):
            result = self._record(index, entry)
            if isinstance(result, LlavaRecord):
                if result.id in seen:
                    result = self._bad(result.id, "duplicate id; expected unique ids", "duplicate_id")
                else:
                    seen.add(result.id)
            yield result

    def _record(self, index: int, entry: object) -> LlavaRecord | DataError:
        if not isinstance(entry, dict):
            return self._bad(f"#{index}", f"expected an object, got {type(entry).__name__}", "wrong_type")
        raw_id = entry.get("id")
        if raw_id is not None and not (isinstance(raw_id, str) or _int_id(raw_id)):
            return self._bad(f"#{index}", _expected("id", "a string or integer", raw_id), "wrong_type")
        record_id = str(raw_id) if raw_id is not None else f"#{index}"
        image = entry.get("image")
        references = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(references, list) or not all(_nonempty_str(ref) for ref in references):
            return self._bad(record_id, _expected("image", "a path or a list of paths", image), "wrong_type")
        turns = entry.get("conversations")
        if not isinstance(turns, list) or not turns:
            return self._bad(
                record_id, _expected("conversations", "a non-empty list", turns), "missing_field"
            )
        parsed: list[Turn] = []
        for number, turn in enumerate(turns):
            if not (
                isinstance(turn, dict)
                and turn.get("from") in LLAVA_ROLES
                and isinstance(turn.get("value"), str)
            ):
                what = f"{{'from': one of {LLAVA_ROLES}, 'value': str}}"
                return self._bad(record_id, _expected(f"conversations[{number}]", what, turn), "wrong_type")
            parsed.append(Turn(turn["from"], turn["value"]))
        problem = self._turn_problem(record_id, parsed)
        if problem is not None:
            return problem
        placeholders = sum(turn.value.count(IMAGE_PLACEHOLDER) for turn in parsed)
        if placeholders != len(references):
            reason = f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(references)} image(s)"
            return self._bad(record_id, reason + "; expected one per image", "placeholder_mismatch")
        image_paths = tuple(_resolve(self.image_root, reference) for reference in references)
        problem = self._probe(record_id, image_paths)
        return (
            problem
            if isinstance(problem, DataError)
            else LlavaRecord(record_id, image_paths, tuple(parsed), self.path)
        )

    def _turn_problem(self, record_id: str, turns: list[Turn]) -> DataError | None:
        start = 1 if turns[0].role == "system" else 0
        for number, turn in enumerate(turns[start:]):
            expected = ("human", "gpt")[number % 2]
            if turn.role != expected:
                reason = f"conversations[{number + start}] is from {turn.role!r}; expected {expected!r}"
                return self._bad(record_id, reason + " (human/gpt alternate)", "bad_turn_order")
            if turn.role == "gpt" and not turn.value.strip():
                return self._bad(record_id, f"conversations[{number + start}]: empty answer", "empty_answer")
        if len(turns) - start < 2:
            return self._bad(record_id, "no 'gpt' turn; expected at least one answer", "missing_field")
        return None

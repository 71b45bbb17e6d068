"""The text-to-image prompt loader (`PromptsLoader`): JSONL rows with a prompt, a tag and an optional
reference image."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_recipes.image_io import (
    DEFAULT_MAX_PIXELS,
    load_image,
)
from data_recipes.loaders.base import DataError, Loader
from data_recipes.loaders.fields import _expected, _int_id, _nonempty_str, _resolve

# --- prompt JSONL -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRecord:
    """A text-to-image prompt (GenEval style). `fields` holds the whole JSON line (e.g. include/exclude specs);
    `image_path` is the reference image ("file" or "image" field), if any."""

    prompt_id: str
    prompt: str
    tag: str | None
    heldout: bool
    image_path: Path | None
    line: int
    source: Path
    fields: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def id(self) -> str:
        return self.prompt_id

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        if self.image_path is None:
            raise ValueError(f"{self.source}: prompt {self.prompt_id} has no reference image")
        return load_image(self.image_path, max_pixels=max_pixels)


class PromptsLoader(Loader):
    """Prompt JSONL: one JSON object per line with a non-empty "prompt"; optional "prompt_id" (default: the line
    number), "tag" (str), "heldout" (bool), "file"/"image" (reference image path). Blank lines are ignored."""

    def __init__(
        self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, **options: Any
    ):
        super().__init__(**options)
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def _records(self) -> Iterator[PromptRecord | DataError]:
        if not self.path.is_file():
            raise DataError(self.path, None, "file not found; expected a prompts JSONL file", "missing_file")
        seen: set[str] = set()
        with self.path.open("rb") as handle:
            for line_number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                result = self._record(line_number, raw)
                if isinstance(result, PromptRecord):
                    if result.prompt_id in seen:
                        label = f"{result.prompt_id} (line {line_number})"
                        result = self._bad(label, "duplicate prompt_id; expected unique ids", "duplicate_id")
                    else:
                        seen.add(result.prompt_id)
                yield result

    def _record(self, line_number: int, raw: bytes) -> PromptRecord | DataError:
        label = f"line {line_number}"
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._bad(
                label, f"invalid JSON ({exc}); expected one UTF-8 JSON object per line", "invalid_json"
            )
        if not isinstance(entry, dict):
            return self._bad(label, f"expected a JSON object, got {type(entry).__name__}", "wrong_type")
        raw_id = entry.get("prompt_id", line_number)
        if not (isinstance(raw_id, str) or _int_id(raw_id)):
            return self._bad(label, _expected("prompt_id", "a string or integer", raw_id), "wrong_type")
        label = f"{raw_id} (line {line_number})"
        if "prompt" not in entry:
            return self._bad(label, "missing 'prompt'; expected a non-empty string", "missing_field")
        if not _nonempty_str(entry["prompt"]):
            return self._bad(
                label, _expected("prompt", "a non-empty string", entry["prompt"]), "empty_prompt"
            )
        tag, heldout = entry.get("tag"), entry.get("heldout", False)
        if tag is not None and not isinstance(tag, str):
            return self._bad(label, _expected("tag", "a string", tag), "wrong_type")
        if not isinstance(heldout, bool):
            return self._bad(label, _expected("heldout", "true or false", heldout), "wrong_type")
        reference = entry.get("file", entry.get("image"))
        if reference is not None and not _nonempty_str(reference):
            return self._bad(label, _expected("file", "a path string", reference), "wrong_type")
        image_path = _resolve(self.image_root, reference) if reference is not None else None
        problem = self._probe(label, [image_path] if image_path is not None else [])
        if isinstance(problem, DataError):
            return problem
        return PromptRecord(
            str(raw_id), entry["prompt"], tag, heldout, image_path, line_number, self.path, entry
        )

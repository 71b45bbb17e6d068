"""The small field checks and file helpers every loader format uses: describing and naming an unexpected value,
id and string checks, resolving an image reference, reading a JSON annotation file (or a `DataError` saying why
not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_recipes.loaders.base import DataError


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(name: str, what: str, value: object) -> str:
    return f"{name!r}: expected {what}, got {_describe(value)}"


def _nonempty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _int_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve(root: Path, reference: str) -> Path:
    path = Path(reference)
    return path if path.is_absolute() else root / path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(path, None, f"file not found; expected a {what} JSON file", "missing_file")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            path, None, f"cannot parse JSON ({exc}); expected a {what} file", "invalid_json"
        ) from exc

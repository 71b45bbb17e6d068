"""The loaders' shared ground: `DataError`, the `SkipCounter` of skipped records, the `Loader` base class
(iteration, bad-sample policy, lazy image probing) and the small field checks every format uses."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_recipes.image_io import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    probe_image,
)

OnBadSample = Literal["error", "skip"]
ON_BAD_SAMPLE: tuple[str, ...] = ("error", "skip")
_EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """A malformed file or record: `file`, `record` (id, or None for the whole file), `reason` (what was expected)
    and `kind` (a short reason key, the one `SkipCounter` counts by)."""

    def __init__(self, file: str | os.PathLike, record: object, reason: str, kind: str = "invalid") -> None:
        self.file = str(file)
        self.record = None if record is None else str(record)
        self.reason = reason
        self.kind = kind
        where = self.file if self.record is None else f"{self.file}: record {self.record}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.file, self.record, self.reason, self.kind))


@dataclass
class SkipCounter:
    """Skipped records per reason key, with the first few messages of each (for the report)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, error: DataError) -> None:
        self.counts[error.kind] += 1
        examples = self.examples.setdefault(error.kind, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """A human-readable summary: one line per reason with its count and an example."""
        if not self.total:
            return "no records skipped"
        lines = [f"skipped {self.total} record(s):"]
        for kind, count in self.counts.most_common():
            lines.append(f"  {kind}: {count} (e.g. {self.examples[kind][0]})")
        return "\n".join(lines)


class Loader:
    """Shared handling of bad samples and image checks. Subclasses set `path` (named in errors) and implement
    `_records()`, yielding records and, for bad ones, DataError instances."""

    path: Path

    def __init__(
        self,
        on_bad_sample: OnBadSample = "error",
        check_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        skips: SkipCounter | None = None,
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample: expected one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.check_images = check_images
        self.max_pixels = max_pixels
        self.skips = skips if skips is not None else SkipCounter()
        self._probed: dict[Path, tuple[int, int] | ImageLoadError] = {}

    def __iter__(self) -> Iterator[Any]:
        for item in self._records():
            if isinstance(item, DataError):
                if self.on_bad_sample == "error":
                    raise item
                self.skips.add(item)
            else:
                yield item

    def load(self) -> list[Any]:
        """All good records as a list."""
        return list(self)

    def _records(self) -> Iterator[Any]:
        raise NotImplementedError

    def _bad(self, record: object, reason: str, kind: str) -> DataError:
        return DataError(self.path, record, reason, kind)

    def _probe(self, record: object, paths: Iterable[Path]) -> DataError | list[tuple[int, int]]:
        """With check_images, fully decode each image (once per path per loader): the sizes, or a DataError for
        the first bad one."""
        sizes = []
        for path in paths if self.check_images else ():
            if path not in self._probed:
                try:
                    self._probed[path] = probe_image(path, max_pixels=self.max_pixels)
                except ImageLoadError as exc:
                    self._probed[path] = exc
            result = self._probed[path]
            if isinstance(result, ImageLoadError):
                kind = "bad_image" if Path(path).is_file() else "missing_image"
                return self._bad(record, f"image {result}", kind)
            sizes.append(result)
        return sizes

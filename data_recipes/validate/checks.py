"""What every validation shares: the `Problem` and `ValidationReport` types, format detection, and the
`Validation` bookkeeping (problems, record counts, image references and the image checks)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_recipes.image_io import ImageLoadError, probe_image
from data_recipes.loaders.base import DataError, Loader, SkipCounter

FORMATS: tuple[str, ...] = (
    "auto",
    "shapes",
    "llava",
    "coco_captions",
    "vqav2",
    "prompts",
    "image_folder",
    "webdataset",
)
SHAPES_IMAGE_PATTERN = "images/{image_id:07d}.png"  # shapes_dataset's image file names, relative to a split
DEFAULT_PROBLEMS_SHOWN = 50
# Loader kinds renamed to this module's vocabulary; the others are reported as the loaders name them.
_KIND_ALIASES = {
    "invalid_json": "malformed_json",
    "bad_image": "unreadable_image",
    "unknown_image_id": "unknown_id",
    "orphan_annotation": "unknown_id",
    "missing_shard": "missing_file",
}
# What was expected, for loader messages that do not say it themselves.
_EXPECTATIONS = {
    "missing_annotation": "expected one annotation per question",
    "orphan_annotation": "expected a question with this question_id",
    "unknown_image_id": "expected an image id listed in 'images'",
    "image_id_mismatch": "expected the same image_id in the questions and the annotations",
    "empty_answer": "expected a non-empty answer",
    "empty_caption": "expected a non-empty caption",
    "size_mismatch": "expected the declared width and height",
    "bad_shard": "expected a complete tar file",
}


@dataclass(frozen=True)
class Problem:
    """One defect: the file, the record in it (None: the file as a whole), a kind key and the message (which
    says what was expected)."""

    file: str
    record: str | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file}: record {self.record}"
        return f"{where}: {self.message} [{self.kind}]"


@dataclass
class ValidationReport:
    """The outcome of `validate_dataset`: `problems` in the order found, `records_checked` per file (entries
    read: conversations, images + caption annotations, questions, annotations, lines, image files)."""

    path: str
    format: str
    problems: list[Problem] = field(default_factory=list)
    records_checked: dict[str, int] = field(default_factory=dict)
    images_checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> Counter:
        """Number of problems per kind."""
        return Counter(problem.kind for problem in self.problems)

    def render_problems(self, limit: int = DEFAULT_PROBLEMS_SHOWN) -> str:
        """The first `limit` problems, one a line, and how many more there are."""
        lines = [str(problem) for problem in self.problems[: max(limit, 0)]]
        hidden = len(self.problems) - len(lines)
        if hidden > 0:
            lines.append(f"... and {hidden} more problem(s) (raise --max-problems-shown to see them)")
        return "\n".join(lines)

    def render(self, max_problems: int = 10) -> str:
        """The first `max_problems` problems, then the summary table: per file, records checked and problems
        by kind, with a total line and the verdict."""
        files = list(self.records_checked)
        files += [p.file for p in self.problems if p.file not in self.records_checked and p.file not in files]
        by_file: dict[str, Counter] = {name: Counter() for name in files}
        for problem in self.problems:
            by_file[problem.file][problem.kind] += 1
        rows = [("file", "records", "problems", "by kind")]
        for name in files:
            counts = by_file[name]
            records, problems = str(self.records_checked.get(name, 0)), str(sum(counts.values()))
            rows.append((_relative(name, self.path), records, problems, _kinds(counts)))
        total = sum(self.records_checked.values())
        rows.append(("total", str(total), str(len(self.problems)), _kinds(self.kinds())))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        table = [
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip()
            for row in rows
        ]
        table.insert(1, "-" * len(table[0]))
        table.insert(len(table) - 1, "-" * len(table[0]))
        verdict = (
            f"OK: {self.path} ({self.format}) has no problems"
            if self.ok
            else f"FAILED: {self.path} ({self.format}) has {len(self.problems)} problem(s)"
        )
        parts = [self.render_problems(max_problems)] if self.problems and max_problems > 0 else []
        parts.append("\n".join(table))
        parts += [f"note: {note}" for note in self.notes]
        parts.append(f"{verdict}; {total} records and {self.images_checked} images checked")
        return "\n".join(parts)


def _relative(file: str, root: str) -> str:
    """`file` relative to the validated directory `root`, when inside it (shorter table rows)."""
    try:
        return Path(file).relative_to(root).as_posix() if Path(root).is_dir() else file
    except ValueError:
        return file


def _kinds(counts: Counter) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in counts.most_common()) or "-"


@dataclass
class _CollectingSkips(SkipCounter):
    """A SkipCounter that keeps every DataError, so that all of them are reported, not only examples."""

    errors: list[DataError] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        super().add(error)
        self.errors.append(error)


def _json_position(error: BaseException | None) -> str | None:
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno} column {error.colno}"
    return None


def _read_json_file(path: Path, what: str) -> Any:
    """Parsed JSON, or DataError (missing_file / malformed_json with line and column)."""
    if not path.is_file():
        raise DataError(path, None, f"file not found; expected a {what} JSON file", "missing_file")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        reason = f"malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); expected a {what} file"
        raise DataError(path, None, reason, "malformed_json") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            path, None, f"cannot read ({exc}); expected a UTF-8 {what} JSON file", "malformed_json"
        ) from exc


def detect_format(path: str | os.PathLike) -> str:
    """The format of `path` (one of FORMATS but "auto"): a directory with manifest.json is a shapes dataset,
    other directories image folders; .jsonl is prompts, .tar* webdataset; .json by its top-level structure.
    Raises DataError for unparseable JSON and ValueError when the format cannot be told."""
    path = Path(path)
    if path.is_dir():
        return "shapes" if (path / "manifest.json").is_file() else "image_folder"
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory; expected a dataset directory or file")
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return "prompts"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        return "llava"
    if head.startswith(b"{"):
        data = _read_json_file(path, "dataset")
        if "questions" in data or ("annotations" in data and "images" not in data):
            return "vqav2"
        if "images" in data or "annotations" in data:
            return "coco_captions"
    raise ValueError(
        f"{path}: cannot tell the format (expected a JSON list of LLaVA conversations, a COCO captions or "
        "VQAv2 object, a .jsonl prompt file, a .tar shard or a directory); "
        f"pass --format one of {', '.join(FORMATS[1:])}"
    )


class Validation:
    """Collects problems, record counts and image references while the files are checked."""

    def __init__(self, path: Path, fmt: str, max_pixels: int, check_images: bool, progress: bool) -> None:
        self.report = ValidationReport(str(path), fmt)
        self.max_pixels = max_pixels
        self.check_images = check_images
        self.progress = progress
        self.image_refs: dict[Path, list[tuple[str, str]]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def add(self, file: str | os.PathLike, record: object, kind: str, message: str) -> None:
        record_label = None if record is None else str(record)
        self.report.problems.append(Problem(str(file), record_label, kind, message))

    def add_error(self, error: DataError) -> None:
        record = error.record
        if record is None:
            record = _json_position(error.__cause__)
        reason = error.reason
        if "expected" not in reason and error.kind in _EXPECTATIONS:
            reason = f"{reason}; {_EXPECTATIONS[error.kind]}"
        self.add(error.file, record, _KIND_ALIASES.get(error.kind, error.kind), reason)

    def count(self, file: str | os.PathLike, records: int) -> None:
        key = str(file)
        self.report.records_checked[key] = self.report.records_checked.get(key, 0) + records

    def reference(self, image: Path, file: str | os.PathLike, record: object) -> None:
        self.image_refs.setdefault(image, []).append((str(file), str(record)))

    def run_loader(
        self, loader_class: type[Loader], *args: Any, **options: Any
    ) -> tuple[list[Any], list[DataError]]:
        """All good records of a loader (built with on_bad_sample="skip") and the record-level errors it
        reported; those and any whole-file error are recorded as problems."""
        skips = _CollectingSkips()
        loader = loader_class(*args, on_bad_sample="skip", skips=skips, **options)
        records: list[Any] = []
        try:
            records.extend(loader)
        except DataError as error:  # the file as a whole cannot be read
            self.add_error(error)
        for error in skips.errors:
            self.add_error(error)
        return records, skips.errors

    def json_file(self, path: Path, what: str) -> Any:
        try:
            return _read_json_file(path, what)
        except DataError as error:
            self.add_error(error)
            return None

    # -- images --------------------------------------------------------------------------------------------

    def check_referenced_images(self, expected_size: tuple[int, int] | None = None) -> None:
        """Every referenced image exists and (unless check_images is off) fully decodes, at `expected_size`.
        A bad image is one problem, reported at its first reference (which names the others)."""
        for path in tqdm(
            list(self.image_refs), desc="images", unit="img", disable=not self.progress, file=sys.stderr
        ):
            if not path.is_file():
                kind, message = "missing_image", f"image {path} not found; expected an existing image file"
            elif not self.check_images:
                continue
            else:
                self.report.images_checked += 1
                try:
                    size = probe_image(path, max_pixels=self.max_pixels)
                except ImageLoadError as error:
                    kind, message = "unreadable_image", f"image {error}"
                else:
                    if expected_size is None or size == expected_size:
                        continue
                    kind = "size_mismatch"
                    message = (
                        f"image {path} is {size[0]}x{size[1]}; "
                        f"expected {expected_size[0]}x{expected_size[1]} (the manifest's size)"
                    )
            (file, record), *others = self.image_refs[path]
            if others:
                named = ", ".join(f"{Path(f).name} {r}" for f, r in others[:3])
                more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                message += f" (also used by {len(others)} other record(s): {named}{more})"
            self.add(file, record, kind, message)


def _quiet_json(path: Path) -> Any:
    """Parsed JSON, or None when unreadable (a loader reports why)."""
    try:
        return _read_json_file(path, "JSON")
    except DataError:
        return None


def _list_length(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return len(value) if isinstance(value, list) else 0

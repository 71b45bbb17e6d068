"""Dataset validation (`dualtoken data validate`): every problem of a dataset, found before training on it.

PATH is a shapes-world dataset directory (the layout of `data_recipes.shapes_dataset`), a single file of one
of the real formats (LLaVA JSON, COCO captions JSON, VQAv2 questions or annotations JSON, prompts JSONL,
webdataset tar shard) or an image folder. Record-level rules are the loaders' own (`data_recipes.loaders`,
run with `on_bad_sample="skip"`), so a dataset that validates cleanly is one the loaders read without a skip.
On top of them this module checks what a single loader cannot see:

- every referenced image exists and fully decodes (`data_recipes.image_io.probe_image`), each file once;
- shapes world: manifest and class list, scenes.jsonl (fields, types, scenes, ids named by their image files),
  that every image file belongs to a scene and every record refers to a scene of its split, VQA questions and
  annotations one to one, image ids disjoint across splits, no held-out pair in train/val, manifest counts and
  image sizes as declared.

Each defect is a `Problem(file, record, kind, message)`; the message says what was expected. Kinds include
missing_file, malformed_json, missing_field, wrong_type, placeholder_mismatch, empty_answer, empty_caption,
empty_prompt, empty_question, duplicate_id, unknown_id, missing_annotation, missing_record, missing_image,
unreadable_image, size_mismatch, unlisted_image, inconsistent, invalid_scene, heldout_leak, count_mismatch
(loader kinds such as bad_turn_order pass through unchanged).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_recipes.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, probe_image
from data_recipes.loaders import (
    CocoCaptionsLoader,
    DataError,
    ImageFolderLoader,
    LlavaLoader,
    Loader,
    PromptsLoader,
    SkipCounter,
    VQALoader,
    WebDatasetLoader,
)
from data_recipes.shapes import Scene, normalize_pairs
from data_recipes.shapes_dataset import FORMAT, SPLIT_FILES, SPLITS, VERSION

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
_SCENE_FIELDS: dict[str, tuple[type, str]] = {
    "image_id": (int, "an integer"),
    "file": (str, "a path string"),
    "heldout": (bool, "true or false"),
    "scene": (dict, "a scene object"),
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


class _Validation:
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

    # -- the real formats ----------------------------------------------------------------------------------

    def llava(self, path: Path, image_root: Path | None) -> list[Any]:
        records, errors = self.run_loader(LlavaLoader, path, image_root=image_root)
        self.count(path, len(records) + sum(e.record is not None for e in errors))
        for record in records:
            for image in record.image_paths:
                self.reference(image, path, record.id)
        return records

    def coco_captions(self, path: Path, image_root: Path | None) -> list[Any]:
        records, errors = self.run_loader(CocoCaptionsLoader, path, image_root=image_root)
        # every entry of "images" and "annotations" ends up in a record or in an error
        entries = (
            len(records) + sum(len(r.captions) for r in records) + sum(e.record is not None for e in errors)
        )
        self.count(path, entries)
        for record in records:
            self.reference(record.image_path, path, f"image {record.image_id}")
        return records

    def vqav2(
        self, path: Path, annotations: Path | None, image_root: Path | None, image_pattern: str | None
    ) -> list[Any]:
        """Questions (with their annotations when given) or, when `path` holds annotations, those alone."""
        data = self.json_file(path, "VQAv2")
        if data is None:
            return []
        if isinstance(data, dict) and "questions" not in data and "annotations" in data:
            if annotations is not None:
                raise ValueError(f"{path} holds VQAv2 annotations; pass the questions file as PATH instead")
            return self._vqa_annotations_only(path, data)
        pattern = image_pattern or SHAPES_IMAGE_PATTERN
        records, _ = self.run_loader(
            VQALoader, path, annotations, image_pattern=pattern, image_root=image_root
        )
        self.count(path, _list_length(data, "questions"))
        if annotations is not None:
            self.count(annotations, _list_length(_quiet_json(annotations), "annotations"))
        if image_pattern is None:
            self.report.notes.append(f"images of {path} not checked: pass --image-pattern to check them")
        else:
            for record in records:
                self.reference(record.image_path, path, record.question_id)
        return records

    def _vqa_annotations_only(self, path: Path, data: Any) -> list[Any]:
        # The loader's own annotation rules; VQALoader offers them only through this (private) step.
        loader = VQALoader(path, path, image_pattern=SHAPES_IMAGE_PATTERN)
        annotations: dict[int, dict | None] = {}
        try:
            for error in loader._read_annotations(annotations):
                self.add_error(error)
        except DataError as error:
            self.add_error(error)
        self.count(path, _list_length(data, "annotations"))
        self.report.notes.append(f"{path} checked alone: pass the questions file as PATH to pair them")
        return []

    def prompts(self, path: Path, image_root: Path | None) -> list[Any]:
        records, errors = self.run_loader(PromptsLoader, path, image_root=image_root)
        self.count(path, len(records) + sum(e.record is not None for e in errors))
        for record in records:
            if record.image_path is not None:
                self.reference(record.image_path, path, record.id)
        return records

    def image_folder(self, path: Path) -> None:
        records, errors = self.run_loader(ImageFolderLoader, path)
        self.count(path, len(records) + len(errors))
        for record in records:
            self.reference(record.path, path, record.id)

    def webdataset(self, path: Path) -> None:
        records, errors = self.run_loader(
            WebDatasetLoader, path, check_images=self.check_images, max_pixels=self.max_pixels
        )
        self.count(path, len(records) + sum(e.record is not None for e in errors))
        self.report.images_checked += len(records) if self.check_images else 0

    # -- the shapes world ----------------------------------------------------------------------------------

    def shapes(self, root: Path) -> None:
        manifest = self._manifest(root / "manifest.json")
        self._classes(root / "classes.json")
        heldout: set[tuple[str, str]] = set()
        try:
            heldout = set(normalize_pairs([tuple(pair) for pair in manifest.get("heldout_pairs") or []]))
        except (TypeError, ValueError) as error:
            self.add(
                root / "manifest.json", "heldout_pairs", "wrong_type", f"expected color-shape pairs ({error})"
            )
        owner: dict[int, str] = {}  # image id -> split, for disjointness
        prompt_ids: dict[str, str] = {}
        split_counts: dict[str, tuple[int, int]] = {}
        for split in SPLITS:
            split_dir = root / split
            scenes = self._scenes(split_dir, split, heldout, owner)
            split_counts[split] = (len(scenes), sum(heldout_flag for _, heldout_flag in scenes.values()))
            self._cross_check_split(split_dir, scenes, prompt_ids)
        self._manifest_counts(root / "manifest.json", manifest, split_counts)
        size = manifest.get("size")
        expected = (size, size) if _is_int(size) else None
        self.check_referenced_images(expected)

    def _manifest(self, path: Path) -> dict:
        manifest = self.json_file(path, "shapes-world manifest")
        self.count(path, 0 if manifest is None else 1)
        if manifest is None:
            return {}
        if not isinstance(manifest, dict):
            self.add(path, None, "wrong_type", f"expected a JSON object, got {type(manifest).__name__}")
            return {}
        for key, expected in (("format", FORMAT), ("version", VERSION)):
            if key not in manifest:
                self.add(path, key, "missing_field", f"missing {key!r}; expected {expected!r}")
            elif manifest[key] != expected:
                self.add(path, key, "inconsistent", f"{key!r} is {manifest[key]!r}; expected {expected!r}")
        for key in ("size", "n"):
            value = manifest.get(key)
            if key not in manifest:
                self.add(path, key, "missing_field", f"missing {key!r}; expected a positive integer")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self.add(path, key, "wrong_type", f"{key!r}: expected a positive integer, got {value!r}")
        for key in ("splits", "heldout_scenes"):
            value = manifest.get(key)
            if key not in manifest:
                self.add(path, key, "missing_field", f"missing {key!r}; expected scene counts per split")
            elif not (isinstance(value, dict) and all(_is_int(value.get(split)) for split in SPLITS)):
                what = f"an object with integer counts for {', '.join(SPLITS)}"
                self.add(path, key, "wrong_type", f"{key!r}: expected {what}, got {_short(value)}")
        return manifest

    def _classes(self, path: Path) -> None:
        data = self.json_file(path, "class list")
        if data is None:
            return
        classes = data.get("classes") if isinstance(data, dict) else None
        if not isinstance(classes, list):
            self.add(path, "classes", "wrong_type", f"expected {{'classes': [str, ...]}}, got {_short(data)}")
            return
        self.count(path, len(classes))
        seen: set[str] = set()
        for index, label in enumerate(classes):
            if not isinstance(label, str) or not label.strip():
                self.add(
                    path, f"classes[{index}]", "wrong_type", f"expected a non-empty label, got {label!r}"
                )
            elif label in seen:
                self.add(
                    path,
                    f"classes[{index}]",
                    "duplicate_id",
                    f"class {label!r} repeats; expected unique labels",
                )
            seen.add(label)

    def _scenes(
        self, split_dir: Path, split: str, heldout: set[tuple[str, str]], owner: dict[int, str]
    ) -> dict[int, tuple[Path, bool]]:
        """image id -> (image path, heldout flag) of the good lines of scenes.jsonl; problems recorded."""
        path = split_dir / SPLIT_FILES["scenes"]
        scenes: dict[int, tuple[Path, bool]] = {}
        if not path.is_file():
            self.add(path, None, "missing_file", "file not found; expected the split's scenes JSONL file")
            return scenes
        with path.open("rb") as handle:
            lines = [(number, raw) for number, raw in enumerate(handle, 1) if raw.strip()]
        self.count(path, len(lines))
        for number, raw in lines:
            entry = self._scene_line(path, number, raw)
            if entry is None:
                continue
            image_id, label = entry["image_id"], f"image {entry['image_id']} (line {number})"
            expected_file = SHAPES_IMAGE_PATTERN.format(image_id=image_id)
            if image_id in owner:
                where = "this split" if owner[image_id] == split else f"split {owner[image_id]}"
                self.add(
                    path, label, "duplicate_id", f"image_id already used in {where}; expected unique ids"
                )
                continue
            owner[image_id] = split
            try:
                scene = Scene.from_dict(entry["scene"])
            except ValueError as error:
                self.add(path, label, "invalid_scene", f"{error}; expected a valid shapes-world scene")
                continue
            leaked = sorted(scene.pairs() & heldout)
            if split != "test" and (leaked or entry["heldout"]):
                what = f"held-out pair(s) {leaked}" if leaked else "'heldout': true"
                self.add(
                    path,
                    label,
                    "heldout_leak",
                    f"{what} in split {split}; expected held-out pairs in test only",
                )
            if entry["file"] != expected_file:
                message = f"'file' is {entry['file']!r}; expected {expected_file!r} for image_id {image_id}"
                self.add(path, label, "inconsistent", message)
            # The id names the image: other files are checked against the image file the id calls for.
            scenes[image_id] = (split_dir / expected_file, entry["heldout"])
            self.reference(split_dir / entry["file"], path, label)
        return scenes

    def _scene_line(self, path: Path, number: int, raw: bytes) -> dict | None:
        label = f"line {number}"
        try:
            entry = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            message = f"malformed JSON at column {exc.colno} ({exc.msg}); expected one JSON object per line"
            self.add(path, label, "malformed_json", message)
            return None
        except UnicodeDecodeError as exc:
            self.add(path, label, "malformed_json", f"not UTF-8 ({exc}); expected one JSON object per line")
            return None
        if not isinstance(entry, dict):
            self.add(path, label, "wrong_type", f"expected a JSON object, got {type(entry).__name__}")
            return None
        if _is_int(entry.get("image_id")):
            label = f"image {entry['image_id']} (line {number})"
        missing = [key for key in _SCENE_FIELDS if key not in entry]
        if missing:
            self.add(
                path,
                label,
                "missing_field",
                f"missing {', '.join(map(repr, missing))}; expected {_SCENE_KEYS}",
            )
            return None
        for key, (kind, what) in _SCENE_FIELDS.items():
            value = entry[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                self.add(path, label, "wrong_type", f"{key!r}: expected {what}, got {_short(value)}")
                return None
        return entry

    def _cross_check_split(
        self, split_dir: Path, scenes: dict[int, tuple[Path, bool]], prompt_ids: dict[str, str]
    ) -> None:
        """The split's files against its scenes: images on disk, LLaVA, captions, VQA and prompts."""
        scene_images = {image: image_id for image_id, (image, _) in scenes.items()}
        images_dir = split_dir / SPLIT_FILES["images"]
        if not images_dir.is_dir():
            self.add(images_dir, None, "missing_file", "directory not found; expected the split's images")
        else:
            files = [image for image in sorted(images_dir.iterdir()) if not image.name.startswith(".")]
            self.count(images_dir, len(files))
            for image in files:
                if image not in scene_images:
                    message = (
                        f"not listed in {SPLIT_FILES['scenes']}; expected every image file to have a scene"
                    )
                    self.add(images_dir, image.name, "unlisted_image", message)
        covered: dict[str, set[int]] = {}

        llava_path = split_dir / SPLIT_FILES["llava"]
        covered["llava"] = set()
        for record in self.llava(llava_path, split_dir):
            for image in record.image_paths:
                if image in scene_images:
                    covered["llava"].add(scene_images[image])
                else:
                    self._unknown_image(llava_path, record.id, image)

        captions_path = split_dir / SPLIT_FILES["captions"]
        covered["captions"] = set()
        for record in self.coco_captions(captions_path, split_dir):
            self._known_id(
                captions_path, f"image {record.image_id}", record.image_id, record.image_path, scenes
            )
            covered["captions"].add(record.image_id)

        questions_path = split_dir / SPLIT_FILES["vqa_questions"]
        annotations_path = split_dir / SPLIT_FILES["vqa_annotations"]
        covered["vqa_questions"] = set()
        for record in self.vqav2(questions_path, annotations_path, split_dir, SHAPES_IMAGE_PATTERN):
            self._known_id(questions_path, record.question_id, record.image_id, record.image_path, scenes)
            covered["vqa_questions"].add(record.image_id)

        prompts_path = split_dir / SPLIT_FILES["prompts"]
        for record in self.prompts(prompts_path, split_dir):
            label = f"{record.id} (line {record.line})"
            if record.id in prompt_ids:
                message = (
                    f"prompt_id already used in {prompt_ids[record.id]}; expected unique ids across splits"
                )
                self.add(prompts_path, label, "duplicate_id", message)
            prompt_ids.setdefault(record.id, str(prompts_path))
            image_id = record.fields.get("image_id")
            if not _is_int(image_id):
                self.add(
                    prompts_path, label, "missing_field", f"'image_id': expected an integer, got {image_id!r}"
                )
            elif record.image_path is None:
                self.add(
                    prompts_path, label, "missing_field", "no 'file'; expected the path of the scene's image"
                )
            else:
                self._known_id(prompts_path, label, image_id, record.image_path, scenes)

        for key, ids in covered.items():
            if self._unreadable(split_dir / SPLIT_FILES[key]):
                continue  # reported already; listing every scene as uncovered would only add noise
            for image_id in sorted(set(scenes) - ids):
                message = (
                    f"no record for scene image {image_id} of {SPLIT_FILES['scenes']}; expected at least one"
                )
                self.add(split_dir / SPLIT_FILES[key], f"image {image_id}", "missing_record", message)

    def _unreadable(self, file: Path) -> bool:
        """Whether `file` had a whole-file problem (missing, malformed, wrong top-level type)."""
        return any(
            p.file == str(file) and (p.record is None or p.kind == "malformed_json")
            for p in self.report.problems
        )

    def _unknown_image(self, file: Path, record: object, image: Path) -> None:
        message = (
            f"image {image} is not a scene of this split; expected one listed in {SPLIT_FILES['scenes']}"
        )
        self.add(file, record, "unknown_id", message)

    def _known_id(
        self, file: Path, record: object, image_id: int, image: Path, scenes: dict[int, tuple[Path, bool]]
    ) -> None:
        if image_id not in scenes:
            message = (
                f"image_id {image_id} is not a scene of this split; expected an id in {SPLIT_FILES['scenes']}"
            )
            self.add(file, record, "unknown_id", message)
        elif scenes[image_id][0] != image:
            message = (
                f"image {image} for image_id {image_id}; expected {scenes[image_id][0]} (from scenes.jsonl)"
            )
            self.add(file, record, "inconsistent", message)

    def _manifest_counts(self, path: Path, manifest: dict, counts: dict[str, tuple[int, int]]) -> None:
        for key, position, what in (("splits", 0, "scenes"), ("heldout_scenes", 1, "held-out scenes")):
            declared = manifest.get(key)
            if not isinstance(declared, dict):
                continue
            for split in SPLITS:
                actual = counts[split][position]
                if _is_int(declared.get(split)) and declared[split] != actual:
                    message = (
                        f"declares {declared[split]} {what}; {split}/{SPLIT_FILES['scenes']} has {actual}"
                    )
                    self.add(path, f"{key}.{split}", "count_mismatch", message)
        total = sum(scenes for scenes, _ in counts.values())
        if _is_int(manifest.get("n")) and manifest["n"] != total:
            message = f"declares n={manifest['n']} scenes; the splits' scenes.jsonl files hold {total}"
            self.add(path, "n", "count_mismatch", message)


_SCENE_KEYS = "{" + ", ".join(f"{key!r}: {what}" for key, (_, what) in _SCENE_FIELDS.items()) + "}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _quiet_json(path: Path) -> Any:
    """Parsed JSON, or None when unreadable (a loader reports why)."""
    try:
        return _read_json_file(path, "JSON")
    except DataError:
        return None


def _list_length(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return len(value) if isinstance(value, list) else 0


def validate_dataset(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    annotations: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    image_pattern: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Check every file and record of the dataset at `path` (see the module docstring).

    `fmt` is one of FORMATS ("auto" detects it). `annotations` pairs a VQAv2 annotations file with the
    questions file `path`; `image_pattern` (a format string over image_id, e.g.
    "val2014/COCO_val2014_{image_id:012d}.jpg") locates VQAv2 images; `image_root` is where relative image
    paths resolve (default: the file's directory). With `check_images=False` images are checked for existence
    only. Raises ValueError for unusable arguments (unknown format, missing path); every defect of the data
    itself is a Problem in the report.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or directory; expected a dataset directory or file")
    if annotations is not None and not Path(annotations).exists():
        raise ValueError(f"--annotations {annotations}: no such file; expected a VQAv2 annotations JSON file")
    validation = _Validation(root, fmt, max_pixels, check_images, progress)
    if fmt == "auto":
        try:
            fmt = "vqav2" if annotations is not None else detect_format(root)
        except DataError as error:  # cannot even be parsed: that is the (only) problem to report
            validation.add_error(error)
            return validation.report
        validation.report.format = fmt
    if annotations is not None and fmt != "vqav2":
        raise ValueError(f"--annotations pairs VQAv2 files; {root} is checked as {fmt}")
    images_from = Path(image_root) if image_root is not None else None
    if fmt == "shapes":
        validation.shapes(root)
        return validation.report
    if fmt == "llava":
        validation.llava(root, images_from)
    elif fmt == "coco_captions":
        validation.coco_captions(root, images_from)
    elif fmt == "vqav2":
        validation.vqav2(root, Path(annotations) if annotations else None, images_from, image_pattern)
    elif fmt == "prompts":
        validation.prompts(root, images_from)
    elif fmt == "image_folder":
        validation.image_folder(root)
    else:
        validation.webdataset(root)
    validation.check_referenced_images()
    return validation.report


def _run_cli(args) -> int:
    try:
        report = validate_dataset(
            args.path,
            args.format,
            annotations=args.annotations,
            image_root=args.image_root,
            image_pattern=args.image_pattern,
            max_pixels=args.max_pixels,
            check_images=not args.no_images,
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"dualtoken data validate: error: {error}", file=sys.stderr)
        return 2
    print(report.render(max_problems=args.max_problems_shown))
    return 0 if report.ok else 1


def register(data_subparsers) -> None:
    """Add `dualtoken data validate`."""
    parser = data_subparsers.add_parser(
        "validate",
        help="check a dataset (shapes world, LLaVA, COCO captions, VQAv2, prompts, image folder)",
        description="Report every problem of a dataset with its file, record and what was expected; "
        "exit 1 when there is any, 0 when there is none (2: bad arguments).",
    )
    parser.add_argument("path", type=Path, help="dataset directory or file")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="format of PATH (default: auto)")
    parser.add_argument(
        "--annotations",
        type=Path,
        metavar="FILE",
        help="VQAv2 annotations JSON to pair with the questions PATH",
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="where relative image paths resolve (default: PATH's dir)",
    )
    parser.add_argument(
        "--image-pattern",
        metavar="PATTERN",
        help="VQAv2 image path over image_id, e.g. 'val2014/{image_id:012d}.jpg'",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_PIXELS,
        help=f"decompression-bomb limit (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--no-images", action="store_true", help="check that images exist, without decoding them"
    )
    parser.add_argument(
        "--max-problems-shown",
        type=int,
        metavar="N",
        default=DEFAULT_PROBLEMS_SHOWN,
        help=f"problems printed before the summary (default {DEFAULT_PROBLEMS_SHOWN})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)

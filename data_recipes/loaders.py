"""Real-format data loaders: image folders, webdataset tar shards, LLaVA JSON, COCO captions, VQAv2, prompt JSONL.

Each loader is an iterable of typed, frozen records. Records carry image *paths* (or, for tar shards, where the
bytes live) and decode lazily through `data_recipes.image_io.load_image`; `check_images=True` makes the loader
fully decode (verify) every image up front. Relative image paths resolve against `image_root` (default: the
directory of the annotation file).

A malformed record is handled by `on_bad_sample`: "error" raises `DataError` (a ValueError naming file, record and
what was expected); "skip" drops the record and counts it by reason in the loader's `SkipCounter` (`loader.skips`,
or one passed in and shared by several loaders), which the caller reads and reports. A file that cannot be read or
parsed at all (missing, not JSON, wrong top-level shape) always raises: there is nothing to skip to.

    loader = LlavaLoader("train/llava.json", on_bad_sample="skip")
    records = list(loader)
    print(loader.skips.report())
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from data_recipes.image_io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    load_image,
    probe_image,
)

OnBadSample = Literal["error", "skip"]
ON_BAD_SAMPLE: tuple[str, ...] = ("error", "skip")
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES: tuple[str, ...] = ("human", "gpt", "system")
WEBDATASET_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VQA_ANSWERS_PER_QUESTION = 10
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


# --- image folder -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFileRecord:
    """One image file of a folder; `label` is its first sub-directory (ImageFolder convention), if any."""

    id: str
    path: Path
    label: str | None

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return load_image(self.path, max_pixels=max_pixels)


class ImageFolderLoader(Loader):
    """Every file with an image extension under `root`, recursively, sorted by relative path (hidden entries and
    other files skipped). Records are named by their path relative to `root`."""

    def __init__(self, root: str | os.PathLike, **options: Any) -> None:
        super().__init__(**options)
        self.path = Path(root)

    def _records(self) -> Iterator[ImageFileRecord | DataError]:
        if not self.path.is_dir():
            raise DataError(self.path, None, "not a directory; expected a folder of images", "missing_file")
        found: list[tuple[str, Path]] = []
        for directory, subdirs, files in os.walk(self.path):
            subdirs[:] = [name for name in subdirs if not name.startswith(".")]
            for name in files:
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    path = Path(directory) / name
                    found.append((path.relative_to(self.path).as_posix(), path))
        for record_id, path in sorted(found):
            problem = self._probe(record_id, [path])
            label = record_id.split("/")[0] if "/" in record_id else None
            yield problem if isinstance(problem, DataError) else ImageFileRecord(record_id, path, label)


# --- webdataset tar shards ----------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        if int(last) < int(first):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths from a brace pattern ("shards/{000000..000009}.tar", "{a,b}.tar"), a glob, or a list of them."""
    specs = [os.fspath(spec)] if isinstance(spec, str | os.PathLike) else [os.fspath(item) for item in spec]
    paths: list[Path] = []
    for pattern in specs:
        for expanded in _expand_braces(pattern):
            if not glob.has_magic(expanded):
                paths.append(Path(expanded))
                continue
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise DataError(expanded, None, "no shard matches this pattern", "missing_file")
            paths.extend(Path(match) for match in matches)
    return paths


@dataclass(frozen=True)
class WebDatasetSample:
    """One image-caption sample of a tar shard. The image is in `image_bytes`, or (when the loader kept only
    offsets) read on demand from (`image_offset`, `image_size`) of the uncompressed shard."""

    key: str
    shard: Path
    image_member: str
    caption: str
    metadata: dict = field(default_factory=dict, compare=False)
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)
    image_offset: int | None = None
    image_size: int | None = None

    @property
    def id(self) -> str:
        return f"{self.shard.name}:{self.key}"

    def read_image_bytes(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        with self.shard.open("rb") as handle:
            handle.seek(self.image_offset or 0)
            data = handle.read(self.image_size or 0)
        if len(data) != self.image_size:
            raise ImageLoadError(
                f"{self.shard}:{self.image_member}", "shard is shorter than when it was indexed"
            )
        return data

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        name = f"{self.shard}:{self.image_member}"
        return load_image(self.read_image_bytes(), max_pixels=max_pixels, name=name)


def _header_recorder() -> tuple[type[tarfile.TarInfo], dict[str, Exception]]:
    """A TarInfo class that records the header error that ended iteration: tarfile stops quietly at a cut or
    garbled header, and only a zero block (EOFHeaderError) is a proper end of archive."""
    ending: dict[str, Exception] = {}

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as exc:
                ending["error"] = exc
                raise

    return RecordingTarInfo, ending


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename, the rest the extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (extension.lower() if dot else "")


class WebDatasetLoader(Loader):
    """Samples of webdataset tar shards (CC12M/img2dataset style): `key.jpg|png|webp|...` plus a caption in
    `key.txt` or in the "caption"/"text" field of `key.json` (whose content becomes `metadata`); a sample's files
    are adjacent. Streams each shard with `tarfile` (compressed shards too). With `keep_image_bytes=False`
    samples hold only offsets, for random access later; that needs uncompressed shards."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        keep_image_bytes: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.shards = expand_shards(shards)
        self.keep_image_bytes = keep_image_bytes

    def _records(self) -> Iterator[WebDatasetSample | DataError]:
        for shard in self.shards:
            yield from self._shard_records(shard)

    def _shard_records(self, shard: Path) -> Iterator[WebDatasetSample | DataError]:
        if not shard.is_file():
            yield DataError(shard, None, "shard not found; expected a tar file", "missing_shard")
            return
        tarinfo_class, ending = _header_recorder()
        seen: set[str] = set()
        key: str | None = None
        parts: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
        try:
            with tarfile.open(shard, "r|*" if self.keep_image_bytes else "r|", tarinfo=tarinfo_class) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = _split_member(member.name)
                    if member_key != key:
                        if key is not None and key not in seen:
                            yield self._sample(shard, key, parts)
                            seen.add(key)
                        if member_key in seen:
                            reason = "key appears again after other keys; expected a sample's files adjacent"
                            yield DataError(shard, member_key, reason, "duplicate_key")
                        key, parts = member_key, {}
                    wanted = extension in ("txt", "json") or self.keep_image_bytes
                    data = tar.extractfile(member).read() if wanted else None  # type: ignore[union-attr]
                    parts[extension] = (member, data)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            hint = "" if self.keep_image_bytes else " (random access needs an uncompressed .tar)"
            yield DataError(shard, None, f"unreadable or truncated tar shard ({exc}){hint}", "bad_shard")
            return
        if not isinstance(ending.get("error"), tarfile.EOFHeaderError):
            reason = f"truncated or corrupt tar shard ({ending.get('error', 'no end-of-archive block')}); "
            yield DataError(shard, None, reason + "the samples before the damage were read", "bad_shard")
            return
        if key is not None and key not in seen:
            yield self._sample(shard, key, parts)

    def _sample(
        self, shard: Path, key: str, parts: dict[str, tuple[tarfile.TarInfo, bytes | None]]
    ) -> WebDatasetSample | DataError:
        images = [extension for extension in parts if extension in WEBDATASET_IMAGE_EXTENSIONS]
        if len(images) != 1:
            found = (
                f"{'no image' if not images else f'{len(images)} images'} (found {', '.join(sorted(parts))})"
            )
            reason = f"{found}; expected exactly one of {WEBDATASET_IMAGE_EXTENSIONS}"
            return DataError(shard, key, reason, "missing_image" if not images else "multiple_images")
        metadata: object = {}
        caption: object = None
        if "json" in parts:
            try:
                metadata = json.loads(parts["json"][1] or b"")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return DataError(shard, key, f"{key}.json is not valid JSON ({exc})", "invalid_json")
            if not isinstance(metadata, dict):
                return DataError(shard, key, f"{key}.json: expected a JSON object", "wrong_type")
            caption = metadata.get("caption", metadata.get("text"))
        if "txt" in parts:
            try:
                caption = (parts["txt"][1] or b"").decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(shard, key, f"{key}.txt is not UTF-8 text ({exc})", "bad_caption")
        if caption is None:
            reason = "no caption; expected key.txt or a 'caption'/'text' field in key.json"
            return DataError(shard, key, reason, "missing_caption")
        if not _nonempty_str(caption):
            return DataError(shard, key, f"empty or non-text caption {_describe(caption)}", "empty_caption")
        member, data = parts[images[0]]
        sample = WebDatasetSample(
            key, shard, member.name, str(caption).strip(), metadata, data, member.offset_data, member.size
        )
        if self.check_images:
            try:
                probe_image(sample.read_image_bytes(), max_pixels=self.max_pixels)
            except ImageLoadError as exc:
                return DataError(shard, key, f"image {member.name}: {exc.reason}", "bad_image")
        return sample


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


# --- COCO captions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRecord:
    """One COCO image with all its captions (annotation order)."""

    image_id: int
    image_path: Path
    captions: tuple[str, ...]
    caption_ids: tuple[int, ...]
    width: int | None
    height: int | None
    source: Path

    @property
    def id(self) -> str:
        return str(self.image_id)

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return load_image(self.image_path, max_pixels=max_pixels)


class CocoCaptionsLoader(Loader):
    """COCO captions JSON: {"images": [{"id", "file_name", "width"?, "height"?}], "annotations": [{"id",
    "image_id", "caption"}]}; one record per image, in "images" order. Bad annotations are counted on their own;
    with check_images, a declared width/height must match the file (in either orientation: EXIF rotation)."""

    def __init__(
        self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, **options: Any
    ):
        super().__init__(**options)
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

    def _records(self) -> Iterator[CaptionRecord | DataError]:
        data = _read_json(self.path, "COCO captions")
        if not (
            isinstance(data, dict)
            and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)
        ):
            raise DataError(
                self.path, None, "expected an object with 'images' and 'annotations' lists", "wrong_type"
            )
        images: dict[int, dict] = {}
        for index, image in enumerate(data["images"]):
            if not (
                isinstance(image, dict) and _int_id(image.get("id")) and _nonempty_str(image.get("file_name"))
            ):
                what = f"expected {{'id': int, 'file_name': str}}, got {_describe(image)}"
                yield self._bad(f"images[{index}]", what, "wrong_type")
            elif image["id"] in images:
                yield self._bad(
                    f"image {image['id']}", "duplicate image id; expected unique ids", "duplicate_id"
                )
            else:
                images[image["id"]] = image
        captions: dict[int, list[tuple[int, str]]] = {image_id: [] for image_id in images}
        seen: set[int] = set()
        for index, annotation in enumerate(data["annotations"]):
            if not (isinstance(annotation, dict) and _int_id(annotation.get("image_id"))):
                what = f"expected {{'id': int, 'image_id': int, 'caption': str}}, got {_describe(annotation)}"
                yield self._bad(f"annotations[{index}]", what, "wrong_type")
                continue
            annotation_id, image_id, caption = (
                annotation.get("id", index),
                annotation["image_id"],
                annotation.get("caption"),
            )
            label = f"annotation {annotation_id}"
            if image_id not in images:
                yield self._bad(label, f"image_id {image_id} is not in 'images'", "unknown_image_id")
            elif not _nonempty_str(caption):
                yield self._bad(label, _expected("caption", "a non-empty string", caption), "empty_caption")
            elif annotation_id in seen:
                yield self._bad(label, "duplicate annotation id; expected unique ids", "duplicate_id")
            else:
                seen.add(annotation_id)
                captions[image_id].append((annotation_id, caption.strip()))
        for image_id, image in images.items():
            yield self._record(image_id, image, captions[image_id])

    def _record(
        self, image_id: int, image: dict, captions: list[tuple[int, str]]
    ) -> CaptionRecord | DataError:
        label = f"image {image_id}"
        if not captions:
            return self._bad(label, "no captions; expected at least one annotation", "no_captions")
        image_path = _resolve(self.image_root, image["file_name"])
        sizes = self._probe(label, [image_path])
        if isinstance(sizes, DataError):
            return sizes
        width, height = (image.get(key) if _int_id(image.get(key)) else None for key in ("width", "height"))
        if (
            sizes
            and width is not None
            and height is not None
            and sizes[0] not in ((width, height), (height, width))
        ):
            reason = f"declared {width}x{height} but {image_path} is {sizes[0][0]}x{sizes[0][1]}"
            return self._bad(label, reason, "size_mismatch")
        return CaptionRecord(
            image_id=image_id,
            image_path=image_path,
            captions=tuple(text for _, text in captions),
            caption_ids=tuple(annotation_id for annotation_id, _ in captions),
            width=width,
            height=height,
            source=self.path,
        )


# --- VQAv2 ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQARecord:
    """A VQAv2 question with its annotation (`answers` empty and the answer fields None when unannotated)."""

    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: tuple[str, ...]
    multiple_choice_answer: str | None
    question_type: str | None
    answer_type: str | None
    source: Path

    @property
    def id(self) -> str:
        return str(self.question_id)

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return load_image(self.image_path, max_pixels=max_pixels)


class VQALoader(Loader):
    """VQAv2 questions JSON ({"questions": [{"question_id", "image_id", "question"}]}) joined with an optional
    annotations JSON ({"annotations": [{"question_id", "image_id", "question_type", "answer_type",
    "multiple_choice_answer", "answers": [{"answer", ...}] x 10}]}). Image files come from `image_pattern`, a
    format string over `image_id` (e.g. "images/{image_id:07d}.png", "val2014/COCO_val2014_{image_id:012d}.jpg")
    relative to `image_root` (default: the questions file's directory)."""

    def __init__(
        self,
        questions: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        *,
        image_pattern: str,
        image_root: str | os.PathLike | None = None,
        answers_per_question: int | None = VQA_ANSWERS_PER_QUESTION,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.path = Path(questions)
        self.annotations_path = Path(annotations) if annotations is not None else None
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        try:
            image_pattern.format(image_id=0)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            what = f"a format string over {{image_id}}, got {image_pattern!r} ({exc!r})"
            raise ValueError(f"image_pattern: expected {what}") from exc
        self.image_pattern = image_pattern
        self.answers_per_question = answers_per_question

    def _records(self) -> Iterator[VQARecord | DataError]:
        data = _read_json(self.path, "VQAv2 questions")
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise DataError(self.path, None, "expected an object with a 'questions' list", "wrong_type")
        annotations: dict[int, dict | None] | None = None
        if self.annotations_path is not None:
            annotations = {}
            yield from self._read_annotations(annotations)
        seen: set[int] = set()
        for index, question in enumerate(data["questions"]):
            if not isinstance(question, dict) or not _int_id(question.get("question_id")):
                what = f"expected {{'question_id': int, 'image_id': int, 'question': str}}, got {_describe(question)}"
                yield self._bad(f"questions[{index}]", what, "wrong_type")
                continue
            question_id = question["question_id"]
            if question_id in seen:
                yield self._bad(question_id, "duplicate question_id; expected unique ids", "duplicate_id")
                continue
            seen.add(question_id)
            if not _int_id(question.get("image_id")):
                yield self._bad(
                    question_id,
                    _expected("image_id", "an integer", question.get("image_id")),
                    "missing_field",
                )
            elif not _nonempty_str(question.get("question")):
                what = _expected("question", "a non-empty string", question.get("question"))
                yield self._bad(question_id, what, "empty_question")
            elif annotations is not None and annotations.get(question_id, {}) is None:
                continue  # its annotation is bad and was reported already
            else:
                yield self._record(question, annotations)
        for question_id in sorted(set(annotations or ()) - seen):
            reason = f"annotation without a question in {self.path}"
            yield DataError(self.annotations_path, question_id, reason, "orphan_annotation")

    def _read_annotations(self, out: dict[int, dict | None]) -> Iterator[DataError]:
        """Fill `out` (question_id -> annotation, None when bad) and yield the problems."""
        path = self.annotations_path
        data = _read_json(path, "VQAv2 annotations")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise DataError(path, None, "expected an object with an 'annotations' list", "wrong_type")
        for index, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or not _int_id(annotation.get("question_id")):
                what = f"expected an object with an integer 'question_id', got {_describe(annotation)}"
                yield DataError(path, f"annotations[{index}]", what, "wrong_type")
                continue
            question_id = annotation["question_id"]
            problem = self._annotation_problem(annotation)
            if question_id in out:
                yield DataError(
                    path, question_id, "duplicate annotation; expected one per question", "duplicate_id"
                )
            elif problem is not None:
                yield DataError(path, question_id, problem[1], problem[0])
                out[question_id] = None
            else:
                out[question_id] = annotation

    def _annotation_problem(self, annotation: dict) -> tuple[str, str] | None:
        answers, count = annotation.get("answers"), self.answers_per_question
        if not isinstance(answers, list) or (count is not None and len(answers) != count):
            return "wrong_type", _expected(
                "answers", f"a list of {count or 'any number of'} answers", answers
            )
        for number, answer in enumerate(answers):
            if not isinstance(answer, dict) or not _nonempty_str(answer.get("answer")):
                return "empty_answer", _expected(f"answers[{number}]", "{'answer': non-empty str}", answer)
        if not _nonempty_str(annotation.get("multiple_choice_answer")):
            what = _expected(
                "multiple_choice_answer", "a non-empty string", annotation.get("multiple_choice_answer")
            )
            return "empty_answer", what
        for key in ("question_type", "answer_type"):
            if key in annotation and not isinstance(annotation[key], str):
                return "wrong_type", _expected(key, "a string", annotation[key])
        return None

    def _record(self, question: dict, annotations: dict[int, dict | None] | None) -> VQARecord | DataError:
        question_id, image_id = question["question_id"], question["image_id"]
        annotation: dict = {}
        if annotations is not None:
            if question_id not in annotations:
                return self._bad(
                    question_id, f"no annotation in {self.annotations_path}", "missing_annotation"
                )
            annotation = annotations[question_id] or {}
            if annotation.get("image_id", image_id) != image_id:
                reason = f"image_id {image_id} but its annotation says {annotation.get('image_id')}"
                return self._bad(question_id, reason, "image_id_mismatch")
        image_path = _resolve(self.image_root, self.image_pattern.format(image_id=image_id))
        problem = self._probe(question_id, [image_path])
        if isinstance(problem, DataError):
            return problem
        return VQARecord(
            question_id=question_id,
            image_id=image_id,
            image_path=image_path,
            question=question["question"],
            answers=tuple(answer["answer"] for answer in annotation.get("answers", ())),
            multiple_choice_answer=annotation.get("multiple_choice_answer"),
            question_type=annotation.get("question_type"),
            answer_type=annotation.get("answer_type"),
            source=self.path,
        )


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


LOADERS: dict[str, type[Loader]] = {
    "image_folder": ImageFolderLoader,
    "webdataset": WebDatasetLoader,
    "llava": LlavaLoader,
    "coco_captions": CocoCaptionsLoader,
    "vqav2": VQALoader,
    "prompts": PromptsLoader,
}


def open_loader(kind: str, path: str | os.PathLike | Sequence[str | os.PathLike], **options: Any) -> Loader:
    """The loader of `kind` (a key of LOADERS) over `path`; `options` go to its constructor."""
    if kind not in LOADERS:
        raise ValueError(f"kind: expected one of {sorted(LOADERS)}, got {kind!r}")
    return LOADERS[kind](path, **options)

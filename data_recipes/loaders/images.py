"""Loaders of bare images: an image folder (`ImageFolderLoader`, ImageFolder labels) and webdataset tar shards
(`WebDatasetLoader`, brace-expanded shard lists, members grouped by key, bytes read lazily)."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_recipes.image_io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    load_image,
    probe_image,
)
from data_recipes.loaders.base import DataError, Loader
from data_recipes.loaders.fields import _describe, _nonempty_str

WEBDATASET_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

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

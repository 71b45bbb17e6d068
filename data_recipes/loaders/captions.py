"""The COCO captions loader (`CocoCaptionsLoader`): a captions annotation file, one record per image with all its
captions."""

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
from data_recipes.loaders.fields import _describe, _expected, _int_id, _nonempty_str, _read_json, _resolve

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

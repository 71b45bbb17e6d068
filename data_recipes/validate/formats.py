"""Validation of the real formats (LLaVA JSON, COCO captions, VQAv2, prompts JSONL, image folder, webdataset
shards), each through its `data_recipes.loaders` loader with `on_bad_sample="skip"`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_recipes.loaders.base import DataError
from data_recipes.loaders.captions import CocoCaptionsLoader
from data_recipes.loaders.images import ImageFolderLoader, WebDatasetLoader
from data_recipes.loaders.llava import LlavaLoader
from data_recipes.loaders.prompts import PromptsLoader
from data_recipes.loaders.vqa import VQALoader
from data_recipes.validate.checks import SHAPES_IMAGE_PATTERN, Validation, _list_length, _quiet_json


class FormatValidation(Validation):
    """The checks of the real formats (LLaVA, COCO captions, VQAv2, prompts, image folder, webdataset): each file
    through its loader, counting records and collecting the image references."""

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

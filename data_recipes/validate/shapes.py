"""Validation of a shapes-world dataset directory: manifest, class list, scenes.jsonl, and the cross-checks
between each split's files that no single loader can see."""

from __future__ import annotations

import json
from pathlib import Path

from data_recipes.shapes import Scene, normalize_pairs
from data_recipes.shapes_dataset import FORMAT, SPLIT_FILES, SPLITS, VERSION
from data_recipes.validate.checks import SHAPES_IMAGE_PATTERN
from data_recipes.validate.formats import FormatValidation

_SCENE_FIELDS: dict[str, tuple[type, str]] = {
    "image_id": (int, "an integer"),
    "file": (str, "a path string"),
    "heldout": (bool, "true or false"),
    "scene": (dict, "a scene object"),
}


class ShapesValidation(FormatValidation):
    """The shapes-world checks: manifest, classes, scenes, the real-format files of each split read through the
    format checks, and the cross-checks between them (ids, splits, held-out pairs, counts, sizes)."""

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

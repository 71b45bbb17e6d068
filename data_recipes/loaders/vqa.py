"""The VQAv2 loader (`VQALoader`): a questions file joined with its annotations (ten answers a question)."""

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

VQA_ANSWERS_PER_QUESTION = 10

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

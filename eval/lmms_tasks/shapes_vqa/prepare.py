"""Turns a shapes-world split into an lmms-eval task directory for `shapes_vqa` (no downloads).

    python -m eval.lmms_tasks.shapes_vqa.prepare --split DATA/test --out TASK_DIR

reads the split's VQAv2 files (`vqa_questions.json`, `vqa_annotations.json`), its `images/` and, when present,
`scenes.jsonl` (held-out flags), and writes into TASK_DIR:

- `shapes_vqa_test.jsonl`: one record per question, with its question and answer types, the ten annotator
  answers, and the absolute path of its image;
- `shapes_vqa.yaml`: the task itself, which includes the repository's `shapes_vqa_template.yaml` (prompt, hooks,
  metric, generation settings) and names that data file by absolute path.

`python -m lmms_eval ... --tasks shapes_vqa --include_path TASK_DIR` then runs it (see `eval.lmms_adapter`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from data_recipes.atomic_io import atomic_write_text
from eval.tasks import SHAPES_IMAGE_PATTERN, heldout_image_ids

TEMPLATE = Path(__file__).resolve().with_name("shapes_vqa_template.yaml")
TASK_NAME = "shapes_vqa"
DATA_NAME = "shapes_vqa_test.jsonl"
YAML_NAME = "shapes_vqa.yaml"


def _load_records(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected the VQAv2 '{key}' file of a shapes-world split")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a '{key}' list")
    return data[key]


def vqa_records(
    split_dir: str | os.PathLike, image_pattern: str = SHAPES_IMAGE_PATTERN
) -> list[dict[str, Any]]:
    """The task's records for one split, in question order; every image must exist."""
    split = Path(split_dir).resolve()
    questions = _load_records(split / "vqa_questions.json", "questions")
    annotations = _load_records(split / "vqa_annotations.json", "annotations")
    by_id: dict[str, dict] = {}
    for index, record in enumerate(annotations):
        missing = [f for f in ("question_id", "answers", "question_type", "answer_type") if f not in record]
        if missing:
            raise ValueError(f"{split / 'vqa_annotations.json'}: annotation {index} lacks {missing}")
        by_id[str(record["question_id"])] = record
    scenes = split / "scenes.jsonl"
    heldout = heldout_image_ids(scenes) if scenes.is_file() else set()
    records = []
    for index, question in enumerate(questions):
        missing = [f for f in ("question_id", "image_id", "question") if f not in question]
        if missing:
            raise ValueError(f"{split / 'vqa_questions.json'}: question {index} lacks {missing}")
        annotation = by_id.get(str(question["question_id"]))
        if annotation is None:
            raise ValueError(
                f"{split / 'vqa_annotations.json'}: no annotation for question {question['question_id']!r}"
            )
        answers = [a["answer"] for a in annotation["answers"] if isinstance(a, dict) and "answer" in a]
        if not answers or len(answers) != len(annotation["answers"]):
            raise ValueError(
                f"{split / 'vqa_annotations.json'}: question {question['question_id']!r} needs a non-empty "
                "'answers' list of {'answer': ...} records"
            )
        image = split / "images" / image_pattern.format(image_id=question["image_id"])
        if not image.is_file():
            raise FileNotFoundError(f"{image} is missing (image {question['image_id']} of {split})")
        records.append(
            {
                "question_id": int(question["question_id"]),
                "image_id": int(question["image_id"]),
                "image": str(image),
                "question": str(question["question"]),
                "answers": [str(a) for a in answers],
                "multiple_choice_answer": str(annotation.get("multiple_choice_answer", answers[0])),
                "question_type": str(annotation["question_type"]),
                "answer_type": str(annotation["answer_type"]),
                "heldout": int(question["image_id"]) in heldout,
            }
        )
    if not records:
        raise ValueError(f"{split / 'vqa_questions.json'}: no questions")
    return records


def prepare_task(split_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the data file and the task YAML into `out_dir`; return the YAML's path."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = vqa_records(split_dir)
    data = out / DATA_NAME
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in records))
    task = {
        "include": str(TEMPLATE),
        "task": TASK_NAME,
        "dataset_kwargs": {"data_files": {"test": str(data)}},
    }
    header = f"# Written by eval.lmms_tasks.shapes_vqa.prepare from {Path(split_dir).resolve()}.\n"
    config = out / YAML_NAME
    atomic_write_text(config, header + yaml.safe_dump(task, sort_keys=False))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.lmms_tasks.shapes_vqa.prepare",
        description="write an lmms-eval shapes_vqa task directory from a shapes-world split",
    )
    parser.add_argument(
        "--split", required=True, help="a split directory, e.g. DATA/test from `dualtoken data shapes`"
    )
    parser.add_argument(
        "--out", required=True, help="the task directory to write (pass it to --include_path)"
    )
    args = parser.parse_args(argv)
    config = prepare_task(args.split, args.out)
    count = sum(1 for _ in (config.parent / DATA_NAME).open(encoding="utf-8"))
    print(f"wrote {config} and {count} questions to {config.parent / DATA_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model-driven evaluation tasks: VQA, captioning and multi-turn chat, each resumable (text-to-image, built on the
same per-sample files and helpers, lives in `eval.t2i_tasks`).

Every task runs the unified model in batches over a dataset in a standard format, appends one JSON line per
sample to a per-sample output file (so an interrupted run continues where it stopped and a finished sample is
never recomputed), then scores the whole file with the metric modules (`eval.vqa_accuracy`,
`eval.caption_metrics`, `eval.t2i_scoring`) and writes `<task>_metrics.json` atomically.

Images are resolved as ``image_root / image_pattern.format(image_id=...)``; the default pattern is the
shapes-world layout (``{image_id:07d}.png``), COCO uses ``COCO_val2014_{image_id:012d}.jpg``. Held-out attribute
combinations are scored separately when the caller passes the held-out image ids (shapes world: `scenes.jsonl`).
`run_vqa(..., shuffled_images=True)` adds a control that asks every question with another image of the set;
`objects=scene_objects(scenes.jsonl)` splits wrong color, shape and position answers into another object's and
absent ones.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_recipes.atomic_io import atomic_write_json, atomic_write_text
from data_recipes.image_io import load_image
from data_recipes.shapes import COLORS, POSITIONS, SHAPES
from data_recipes.shapes_text import QUESTION_FORMS, SHORT_ANSWER_SUFFIX, question_form

SHAPES_IMAGE_PATTERN = "{image_id:07d}.png"


@dataclass
class EvalSettings:
    """What every model-driven task shares."""

    batch_size: int = 16
    # At most `limit` items, a seeded random subset kept in file order (`spread_subset`), so a limited run still
    # covers every part of the file (the shapes-world test split puts its held-out scenes in the second half) and
    # every item kind (a regular stride would alias with the per-image question pattern).
    limit: int | None = None
    max_new_tokens: int = 48
    seed: int = 0
    progress: bool = True


# ------------------------------------------------------------------------------------------ per-sample files
class SampleLog:
    """An append-only JSONL of per-sample outputs keyed by `key`; a torn last line (killed mid-write) is dropped."""

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    if number == len(lines):
                        break  # the last write was interrupted; the sample is simply redone
                    raise ValueError(f"{self.path}:{number}: not valid JSON ({err})") from err
                self.rows[str(row[key])] = row
            self._rewrite()  # drop a torn tail so later appends start on a clean line

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self.rows

    def extend(self, rows: Iterable[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
                self.rows[str(row[self.key])] = row
            handle.flush()
            os.fsync(handle.fileno())


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def contiguous_batches(items: Sequence[Any], size: int, index: Callable[[Any], int]) -> Iterable[list[Any]]:
    """Batches of at most `size` items whose `index` values are consecutive (for the T2I task and lmms-eval)."""
    batch: list[Any] = []
    for item in items:
        if batch and (len(batch) == size or index(item) != index(batch[-1]) + 1):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def spread_subset(items: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """`limit` items drawn uniformly without replacement (seeded, so every run and every resume draws the same
    ones), in their order in `items`; all of them when `limit` is None or not smaller."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def pending_items(
    items: Sequence[Any], log: SampleLog, key: Callable[[Any], Any], limit: int | None
) -> list[Any]:
    return [item for item in spread_subset(items, limit) if key(item) not in log]


def vqa_conversation(question: str) -> list[dict[str, str]]:
    """The one-turn conversation a VQA question is asked in: the image, the question, the short-answer instruction."""
    return [{"role": "user", "content": "<image>\n" + question + SHORT_ANSWER_SUFFIX}]


def heldout_image_ids(scenes_jsonl: str | os.PathLike) -> set[int]:
    """Image ids flagged `"heldout": true` in a shapes-world `scenes.jsonl`."""
    return {image_id for image_id, row in _scene_rows(scenes_jsonl) if row.get("heldout")}


def scene_objects(scenes_jsonl: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """Image id -> its objects (color, shape, size, row, col) from a shapes-world `scenes.jsonl`."""
    objects = {}
    for image_id, row in _scene_rows(scenes_jsonl):
        scene = row.get("scene")
        if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
            raise ValueError(f"{scenes_jsonl} image {image_id}: expected 'scene' with a list of 'objects'")
        objects[image_id] = list(scene["objects"])
    return objects


def _scene_rows(scenes_jsonl: str | os.PathLike) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(scenes_jsonl, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "image_id" not in row:
                raise ValueError(f"{scenes_jsonl} line {number}: expected an object with 'image_id'")
            yield int(row["image_id"]), row


def _chat_settings(settings: EvalSettings, **overrides: Any):
    from mllm.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=settings.max_new_tokens, seed=settings.seed, **overrides)


def progress_bar(total: int, desc: str, settings: EvalSettings):
    return tqdm(total=total, desc=desc, unit="sample", disable=not settings.progress)


# ------------------------------------------------------------------------------------------ VQA
def run_vqa(
    model,
    processor,
    questions_json: str | os.PathLike,
    annotations_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    image_pattern: str = SHAPES_IMAGE_PATTERN,
    heldout_images: set[int] | None = None,
    shuffled_images: bool = False,
    objects: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Answer every VQAv2 question (short-answer prompt, greedy) and score with the official VQA accuracy.

    `objects` (image id -> scene objects, `scene_objects`): the color, shape and position forms of
    `per_question_form` also count how many wrong answers name another object of the image (the wrong object was
    read) and how many name nothing in it (the object was misread; `add_attribute_errors`).

    `shuffled_images`: also answer every question with another image of the evaluated set (`shuffled_image_ids`)
    into `vqa_shuffled_predictions.jsonl`, scored against the same annotations as `metrics["shuffled_images"]`.
    What a question type keeps there is what the question alone gives; the gap to the real images is what the
    model reads from the image.
    """
    from eval.vqa_accuracy import _load_json, _records, evaluate_vqa

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    questions = json.loads(Path(questions_json).read_text(encoding="utf-8"))["questions"]
    subset = spread_subset(questions, settings.limit)

    def answer(items: Sequence[Mapping[str, Any]], file_name: str, desc: str) -> list[dict]:
        log = _answer_vqa(
            model, processor, items, out_dir / file_name, image_root, image_pattern, settings, desc
        )
        return list(log.rows.values())

    # The true answers (existence forms split by them), read with the metric's own file checks.
    annotations, name = _load_json(annotations_json, "annotations")
    truth = {
        a.get("question_id"): a for a in _records(annotations, "annotations", name) if isinstance(a, Mapping)
    }
    texts = {q["question_id"]: q["question"] for q in subset}

    def score(rows: list[dict], with_objects: bool = True) -> dict[str, Any]:
        answers = {row["question_id"]: row["answer"] for row in rows}
        result = evaluate_vqa(answers, questions_json, annotations_json, subset=True)
        forms = per_question_form(result, texts, truth)
        if objects is not None and with_objects:
            add_attribute_errors(forms, rows, result, objects)
        return {**_vqa_summary(result), "per_question_form": forms}

    rows = answer(subset, "vqa_predictions.jsonl", "vqa")
    metrics = {"all": score(rows)}
    if heldout_images is not None:
        for name, keep in (("heldout", True), ("seen", False)):
            part = [row for row in rows if (int(row["image_id"]) in heldout_images) == keep]
            metrics[name] = score(part) if part else None
    if shuffled_images:
        other = shuffled_image_ids([q["image_id"] for q in subset])
        swapped = [{**q, "shown_image_id": other[q["image_id"]]} for q in subset]
        metrics["shuffled_images"] = score(
            answer(swapped, "vqa_shuffled_predictions.jsonl", "vqa (shuffled images)"), with_objects=False
        )
    atomic_write_json(out_dir / "vqa_metrics.json", metrics)
    return metrics


def shuffled_image_ids(image_ids: Iterable[int]) -> dict[int, int]:
    """Each distinct image id -> the next one in sorted order (the last -> the first): a fixed pairing in which no
    question keeps its own image."""
    ids = sorted(set(image_ids))
    if len(ids) < 2:
        raise ValueError("shuffled images need questions on at least two different images")
    return dict(zip(ids, ids[1:] + ids[:1]))


def _answer_vqa(
    model,
    processor,
    questions: Sequence[Mapping[str, Any]],
    log_path: Path,
    image_root: str | os.PathLike,
    image_pattern: str,
    settings: EvalSettings,
    desc: str,
) -> SampleLog:
    """Answer the questions not yet in `log_path` (each with the image `shown_image_id`, default its own)."""
    from mllm.generation import generate_chat

    log = SampleLog(log_path, "question_id")
    todo = [q for q in questions if q["question_id"] not in log]
    bar = progress_bar(len(todo), desc, settings)
    for batch in batched(todo, settings.batch_size):
        shown = [q.get("shown_image_id", q["image_id"]) for q in batch]
        images = [[load_image(Path(image_root) / image_pattern.format(image_id=i))] for i in shown]
        conversations = [vqa_conversation(q["question"]) for q in batch]
        replies = generate_chat(model, processor, conversations, images, _chat_settings(settings))
        log.extend(
            {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                **({"shown_image_id": i} if i != q["image_id"] else {}),
                "question": q["question"],
                "answer": r.text,
            }
            for q, i, r in zip(batch, shown, replies)
        )
        bar.update(len(batch))
    bar.close()
    return log


def per_question_form(
    result: Mapping[str, Any], texts: Mapping[Any, str], truth: Mapping[Any, Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """Accuracy per shapes-world question form (`data_recipes.shapes_text.question_form`; existence split by its
    true answer): {form: {"questions": n, "accuracy": percent}}, in `QUESTION_FORMS` order; questions of no known
    form (real VQAv2 text) are left out, so other datasets get an empty dict."""
    scores: dict[tuple[int, str], list[float]] = {}
    for qid, accuracy in result["per_question"].items():
        form = question_form(texts.get(qid, ""))
        if form is None:
            continue
        rank = QUESTION_FORMS.index(form)
        if form == "existence":
            form = f"existence, answer {truth[qid].get('multiple_choice_answer', '?')}"
        scores.setdefault((rank, form), []).append(accuracy)
    return {
        form: {"questions": len(values), "accuracy": sum(values) / len(values)}
        for (_, form), values in sorted(scores.items())
    }


def add_attribute_errors(
    forms: dict[str, dict[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    result: Mapping[str, Any],
    objects: Mapping[int, Sequence[Mapping[str, Any]]],
) -> None:
    """Split the wrong answers of the color, shape and position forms in `forms` (`per_question_form`) by what
    they name: `wrong_another_object` (the color, shape or place of another object of the image: the model looked
    at the wrong object) and `wrong_absent` (one the image does not hold: it misread the object, or named an empty
    place). Answers are compared as the VQA metric normalizes them; a wrong answer that is neither, say a
    sentence, counts in neither."""
    from eval.vqa_accuracy import normalize_answer

    for form, entry in forms.items():
        if form.split(",")[0] in _ANSWER_VOCABULARY:
            entry.update(wrong_another_object=0, wrong_absent=0)
    for row in rows:
        form = question_form(row["question"])
        attribute = (form or "").split(",")[0]
        if attribute not in _ANSWER_VOCABULARY or result["per_question"].get(row["question_id"], 0.0) > 0.0:
            continue
        said = normalize_answer(row["answer"])
        named = {_object_attribute(obj, attribute) for obj in objects.get(int(row["image_id"]), ())}
        if said in named:
            forms[form]["wrong_another_object"] += 1
        elif said in _ANSWER_VOCABULARY[attribute]:
            forms[form]["wrong_absent"] += 1


# Every answer a color, shape or position question can have.
_ANSWER_VOCABULARY = {"color": set(COLORS), "shape": set(SHAPES), "position": set(POSITIONS.values())}


def _object_attribute(obj: Mapping[str, Any], attribute: str) -> str:
    return POSITIONS[(obj["row"], obj["col"])] if attribute == "position" else obj[attribute]


def _vqa_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("overall", "per_question_type", "per_answer_type", "num_questions")}


# ------------------------------------------------------------------------------------------ captions
def run_captions(
    model,
    processor,
    captions_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    image_pattern: str = SHAPES_IMAGE_PATTERN,
    request: str = "Describe the shapes in this image and where they are.",
) -> dict[str, Any]:
    """Caption every image of a COCO-captions file (greedy) and score CIDEr-D and BLEU-1..4."""
    from eval.caption_metrics import evaluate_captions
    from mllm.generation import generate_chat

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    coco = json.loads(Path(captions_json).read_text(encoding="utf-8"))
    image_ids = [image["id"] for image in coco["images"]]
    log = SampleLog(out_dir / "caption_predictions.jsonl", "image_id")
    todo = pending_items(image_ids, log, lambda i: i, settings.limit)
    bar = progress_bar(len(todo), "captions", settings)
    for batch in batched(todo, settings.batch_size):
        images = [[load_image(Path(image_root) / image_pattern.format(image_id=i))] for i in batch]
        conversations = [[{"role": "user", "content": "<image>\n" + request}] for _ in batch]
        replies = generate_chat(model, processor, conversations, images, _chat_settings(settings))
        log.extend({"image_id": i, "caption": r.text} for i, r in zip(batch, replies))
        bar.update(len(batch))
    bar.close()
    predictions = {row["image_id"]: row["caption"] for row in log.rows.values()}
    result = evaluate_captions(predictions, coco, subset=True)
    metrics = {k: v for k, v in result.items() if k != "per_image"}
    atomic_write_json(out_dir / "caption_metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------------------ chat
def _normalize_sentence(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())


def run_chat(
    model,
    processor,
    llava_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    id_suffix: str = "-chat",
) -> dict[str, Any]:
    """Multi-turn consistency: for each held-out conversation and each assistant turn, give the model the true
    history and score its reply (normalized exact match; shapes-world replies are deterministic sentences).
    Reports accuracy per turn index and overall. `image_root` is the directory the LLaVA `image` paths are
    relative to."""
    from mllm.generation import generate_chat

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    records = [
        r for r in json.loads(Path(llava_json).read_text(encoding="utf-8")) if r["id"].endswith(id_suffix)
    ]
    turns = []
    for record in records:
        messages = [
            {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
            for m in record["conversations"]
        ]
        for turn, index in enumerate(range(1, len(messages), 2)):
            turns.append(
                {
                    "sample_id": f"{record['id']}/{turn}",
                    "turn": turn,
                    "image": record["image"],
                    "history": messages[:index],
                    "reference": messages[index]["content"],
                }
            )
    log = SampleLog(out_dir / "chat_predictions.jsonl", "sample_id")
    todo = pending_items(turns, log, lambda t: t["sample_id"], settings.limit)
    bar = progress_bar(len(todo), "chat", settings)
    for batch in batched(todo, settings.batch_size):
        images = [[load_image(Path(image_root) / t["image"])] for t in batch]
        replies = generate_chat(
            model, processor, [t["history"] for t in batch], images, _chat_settings(settings)
        )
        log.extend(
            {
                "sample_id": t["sample_id"],
                "turn": t["turn"],
                "question": t["history"][-1]["content"],
                "reference": t["reference"],
                "reply": r.text,
                "correct": _normalize_sentence(r.text) == _normalize_sentence(t["reference"]),
            }
            for t, r in zip(batch, replies)
        )
        bar.update(len(batch))
    bar.close()
    per_turn: dict[int, list[bool]] = {}
    for row in log.rows.values():
        per_turn.setdefault(int(row["turn"]), []).append(bool(row["correct"]))
    flat = [c for values in per_turn.values() for c in values]
    metrics = {
        "overall": 100.0 * sum(flat) / max(len(flat), 1),
        "per_turn": {str(t + 1): 100.0 * sum(v) / len(v) for t, v in sorted(per_turn.items())},
        "num_turns": len(flat),
    }
    atomic_write_json(out_dir / "chat_metrics.json", metrics)
    return metrics

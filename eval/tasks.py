"""Model-driven evaluation tasks: VQA, captioning, multi-turn chat and text-to-image, each resumable.

Every task runs the unified model in batches over a dataset in a standard format, appends one JSON line per
sample to a per-sample output file (so an interrupted run continues where it stopped and a finished sample is
never recomputed), then scores the whole file with the metric modules (`eval.vqa_accuracy`,
`eval.caption_metrics`, `eval.t2i_scoring`) and writes `<task>_metrics.json` atomically.

Images are resolved as ``image_root / image_pattern.format(image_id=...)``; the default pattern is the
shapes-world layout (``{image_id:07d}.png``), COCO uses ``COCO_val2014_{image_id:012d}.jpg``. Held-out attribute
combinations are scored separately when the caller passes the held-out image ids (shapes world: `scenes.jsonl`).
`run_vqa(..., shuffled_images=True)` adds a control that asks every question with another image of the set;
`run_t2i(..., reference=True)` scores the prompts' own images and their reconstructions.
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

from data_recipes.atomic_io import atomic_save_png, atomic_write_json, atomic_write_text
from data_recipes.image_io import load_image
from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX

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


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _contiguous_batches(items: Sequence[Any], size: int, index: Callable[[Any], int]) -> Iterable[list[Any]]:
    """Batches of at most `size` items whose `index` values are consecutive."""
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


def _pending(items: Sequence[Any], log: SampleLog, key: Callable[[Any], Any], limit: int | None) -> list[Any]:
    return [item for item in spread_subset(items, limit) if key(item) not in log]


def heldout_image_ids(scenes_jsonl: str | os.PathLike) -> set[int]:
    """Image ids flagged `"heldout": true` in a shapes-world `scenes.jsonl`."""
    ids = set()
    with open(scenes_jsonl, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                if row.get("heldout"):
                    ids.add(int(row["image_id"]))
    return ids


def _chat_settings(settings: EvalSettings, **overrides: Any):
    from mllm.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=settings.max_new_tokens, seed=settings.seed, **overrides)


def _progress(total: int, desc: str, settings: EvalSettings):
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
) -> dict[str, Any]:
    """Answer every VQAv2 question (short-answer prompt, greedy) and score with the official VQA accuracy.

    `shuffled_images`: also answer every question with another image of the evaluated set (`shuffled_image_ids`)
    into `vqa_shuffled_predictions.jsonl`, scored against the same annotations as `metrics["shuffled_images"]`.
    What a question type keeps there is what the question alone gives; the gap to the real images is what the
    model reads from the image.
    """
    from eval.vqa_accuracy import evaluate_vqa

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    questions = json.loads(Path(questions_json).read_text(encoding="utf-8"))["questions"]
    subset = spread_subset(questions, settings.limit)

    def answer(items: Sequence[Mapping[str, Any]], file_name: str, desc: str) -> list[dict]:
        log = _answer_vqa(
            model, processor, items, out_dir / file_name, image_root, image_pattern, settings, desc
        )
        return list(log.rows.values())

    def score(rows: list[dict]) -> dict[str, Any]:
        answers = {row["question_id"]: row["answer"] for row in rows}
        return _vqa_summary(evaluate_vqa(answers, questions_json, annotations_json, subset=True))

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
            answer(swapped, "vqa_shuffled_predictions.jsonl", "vqa (shuffled images)")
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
    bar = _progress(len(todo), desc, settings)
    for batch in _batches(todo, settings.batch_size):
        shown = [q.get("shown_image_id", q["image_id"]) for q in batch]
        images = [[load_image(Path(image_root) / image_pattern.format(image_id=i))] for i in shown]
        conversations = [
            [{"role": "user", "content": "<image>\n" + q["question"] + SHORT_ANSWER_SUFFIX}] for q in batch
        ]
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
    todo = _pending(image_ids, log, lambda i: i, settings.limit)
    bar = _progress(len(todo), "captions", settings)
    for batch in _batches(todo, settings.batch_size):
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
    todo = _pending(turns, log, lambda t: t["sample_id"], settings.limit)
    bar = _progress(len(todo), "chat", settings)
    for batch in _batches(todo, settings.batch_size):
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


# ------------------------------------------------------------------------------------------ text-to-image
def run_t2i(
    model,
    processor,
    prompts_jsonl: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    images_per_prompt: int = 1,
    generation_overrides: Mapping[str, Any] | None = None,
    real_images: str | os.PathLike | None = None,
    teacher_dir: str | os.PathLike | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Draw `images_per_prompt` images per prompt spec, save them as PNGs and verify each with the scene parser
    (GenEval-style accuracy per tag, overall, seen vs held-out).

    With `reference`, the metrics add `reference`: the same check on each scored prompt's own image (its spec's
    `file`, relative to the prompts file's folder) and on that image's reconstruction through the model's image
    tokenizer, i.e. what a generator that reproduced the data exactly would score with and without the
    tokenizer's loss (the ceiling of this metric for this tokenizer); and `caption_use`: the model's image
    cross-entropy on those images with their own captions and with the captions shifted by one prompt (equal
    numbers mean the generator ignores the caption).

    With `real_images` (a folder of PNGs, e.g. the split's `images/`) the metrics add `fd`: the Fréchet distance
    between the generated and the real images' pooled features of the teacher SigLIP tower (`teacher_dir`, by
    default the one the model's image tokenizer was distilled from), not Inception features. With few images the
    covariances are rank-deficient and the number is only comparable between runs of the same size."""
    from eval.t2i_scoring import load_prompt_specs, score_t2i
    from mllm.generation import GenerationSettings, generate_images

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    image_dir = out_dir / "t2i_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    specs = load_prompt_specs(prompts_jsonl)
    log = SampleLog(out_dir / "t2i_samples.jsonl", "prompt_id")
    todo = _pending(specs, log, lambda s: s["prompt_id"], settings.limit)
    overrides = {
        "seed": settings.seed,
        "images_per_prompt": images_per_prompt,
        **(generation_overrides or {}),
    }
    generation = GenerationSettings.for_codebook(model.config.codebook_size, **overrides)
    batch_size = max(1, settings.batch_size // images_per_prompt)
    bar = _progress(len(todo), "t2i", settings)
    position = {str(s["prompt_id"]): i for i, s in enumerate(specs)}
    for batch in _contiguous_batches(todo, batch_size, lambda s: position[str(s["prompt_id"])]):
        # Row r of a call with seed s samples from stream s + r; starting each call at its first prompt's global
        # row keeps every image identical whatever the batch size or the point a resumed run starts from.
        first_row = position[str(batch[0]["prompt_id"])] * images_per_prompt
        result = generate_images(
            model,
            processor,
            [s["prompt"] for s in batch],
            generation.with_overrides(seed=settings.seed + first_row),
        )
        rows = []
        for spec, images in zip(batch, result.images):
            files = []
            for j, image in enumerate(images):
                path = atomic_save_png(image, image_dir / f"{spec['prompt_id']}_{j}.png")
                files.append(path.name)
            rows.append({"prompt_id": spec["prompt_id"], "files": files})
        log.extend(rows)
        bar.update(len(batch))
    bar.close()
    by_id = {str(s["prompt_id"]): s for s in specs}
    paired_specs, paired_images = [], []
    for row in log.rows.values():
        for name in row["files"]:
            paired_specs.append(by_id[str(row["prompt_id"])])
            paired_images.append(load_image(image_dir / name))
    scored = score_t2i(paired_specs, paired_images, show_progress=settings.progress)
    log_verdicts = out_dir / "t2i_verdicts.jsonl"
    if real_images is not None:
        scored["fd"] = generated_vs_real_fd(
            paired_images, real_images, teacher_dir or _image_tokenizer_teacher(processor)
        )
    if reference:
        scored["reference"] = t2i_reference_scores(
            processor, [by_id[str(i)] for i in log.rows], Path(prompts_jsonl).parent, settings, model
        )
    atomic_write_json(out_dir / "t2i_metrics.json", {k: v for k, v in scored.items() if k != "per_sample"})
    atomic_write_text(log_verdicts, "".join(json.dumps(v) + "\n" for v in scored["per_sample"]))
    return {k: v for k, v in scored.items() if k != "per_sample"}


def t2i_reference_scores(
    processor,
    specs: Sequence[Mapping[str, Any]],
    root: Path,
    settings: EvalSettings,
    model=None,
) -> dict[str, Any]:
    """{"real": summary, "reconstructed": summary}: the T2I check on the specs' own images (`root / spec["file"]`)
    and on their reconstructions through `processor`'s image tokenizer (pixel codes -> pixel decoder). With
    `model`, also "caption_use" (see `caption_use_losses`)."""
    from eval.t2i_scoring import score_t2i
    from mllm.generation import decode_codes

    paired = [spec for spec in specs if spec.get("file")]
    if not paired:
        raise ValueError(f"T2I reference: none of the {len(specs)} prompt specs names its image ('file')")
    real = [load_image(root / spec["file"]) for spec in paired]
    reconstructed, codes = [], []
    bar = _progress(len(real), "t2i reference", settings)
    for start in range(0, len(real), settings.batch_size):
        pixel_codes, semantic_codes = processor.encode_images(real[start : start + settings.batch_size])
        reconstructed += decode_codes(processor, pixel_codes)
        codes += list(zip(pixel_codes, semantic_codes))
        bar.update(len(pixel_codes))
    bar.close()
    result = {
        name: score_t2i(paired, images, show_progress=False)["all"]
        for name, images in (("real", real), ("reconstructed", reconstructed))
    }
    if model is not None and len(paired) > 1:
        result["caption_use"] = caption_use_losses(
            model, processor, [spec["prompt"] for spec in paired], codes, settings.batch_size
        )
    return result


def caption_use_losses(
    model, processor, captions: Sequence[str], codes: Sequence[Any], batch_size: int
) -> dict[str, dict[str, float]]:
    """The model's image cross-entropy (per head, nats per code) on images given as codes, once with each image's
    own caption and once with the captions shifted by one (every image gets another prompt's caption)."""
    import torch

    from mllm.generation import eval_mode

    def losses(texts: Sequence[str]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for start in range(0, len(texts), batch_size):
            chunk = range(start, min(start + batch_size, len(texts)))
            batch = processor.collate([processor.t2i_example(texts[i], codes[i]) for i in chunk])
            out = model(**{k: v.to(model.device) for k, v in batch.items()})
            for head in ("pixel", "semantic"):
                value = getattr(out, f"loss_{head}", None)
                if value is not None:
                    totals[head] = totals.get(head, 0.0) + float(value) * len(chunk)
        return {head: total / len(texts) for head, total in totals.items()}

    with torch.no_grad(), eval_mode(model):
        return {
            "own_caption": losses(captions),
            "shifted_caption": losses([*captions[1:], captions[0]]),
        }


def _image_tokenizer_teacher(processor) -> Path:
    source = getattr(getattr(processor.image_tokenizer, "config", None), "_name_or_path", "") or ""
    metrics = Path(source) / "train_metrics.json"
    if not metrics.is_file():
        raise ValueError(
            "run_t2i: the FD needs a teacher; pass teacher_dir (the model's image tokenizer does not record one: "
            f"no {metrics})"
        )
    return Path(json.loads(metrics.read_text(encoding="utf-8"))["teacher"])


def generated_vs_real_fd(
    generated: Sequence[Any],
    real_images: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Fréchet distance between the teacher features of `generated` PIL images and of every PNG in
    `real_images` (both resized to the teacher's input size)."""
    import numpy as np
    import torch

    from tokenizer.image_metrics import frechet_distance
    from tokenizer.teacher_data import to_pixel_values
    from tokenizer.train import load_teacher_tower

    teacher = load_teacher_tower(teacher_dir)
    size = teacher.config.image_size
    real = sorted(Path(real_images).glob("*.png"))
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(
            f"generated_vs_real_fd: need >= 2 images on each side, got {len(generated)} and {len(real)}"
        )

    def features(images):
        out = []
        for first in range(0, len(images), batch_size):
            arrays = [
                np.asarray((load_image(i) if isinstance(i, Path) else i).convert("RGB").resize((size, size)))
                for i in images[first : first + batch_size]
            ]
            pixels = to_pixel_values(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
            with torch.no_grad():
                out.append(teacher(pixel_values=pixels).pooler_output.float())
        return torch.cat(out)

    return {
        "value": frechet_distance(features(list(generated)), features(real)),
        "generated": len(generated),
        "real": len(real),
        "features": f"teacher SigLIP pooled output ({teacher_dir}), not Inception",
    }

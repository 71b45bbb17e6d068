"""Write the shapes-world dataset to disk (`dualtoken data shapes`): images plus every text format we train on.

Layout (the on-disk contract read by `data_recipes.validate` and the loaders):

    DIR/manifest.json, DIR/classes.json
    DIR/<split>/images/<image_id:07d>.png
    DIR/<split>/scenes.jsonl              {"image_id", "file", "heldout", "scene"}
    DIR/<split>/llava.json                LLaVA conversations (caption requests, short-answer VQA, multi-turn chats)
    DIR/<split>/captions.json             COCO captions (six per image)
    DIR/<split>/vqa_questions.json        VQAv2 questions
    DIR/<split>/vqa_annotations.json      VQAv2 annotations (10 identical answers)
    DIR/<split>/prompts.jsonl             GenEval-style T2I prompt specs, each with a render that satisfies it

Splits are disjoint by scene: a scene's split is a hash of its content, so an identical scene never lands in two
splits. Held-out (color, shape) pairs never appear in train/val (scenes, captions, questions, prompts); the test
split holds, besides ordinary scenes, scenes that each use at least one held-out pair, flagged "heldout": true.
Half of the scenes are drawn from a T2I prompt (cycling through the six GenEval tags) and are listed in
prompts.jsonl; the rest are random scenes. Everything is deterministic by seed, whatever the number of workers.
The dataset is built in a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_recipes.shapes import (
    ALL_PAIRS,
    COLOR_NAMES,
    SHAPES,
    Scene,
    ShapeObject,
    normalize_pairs,
    render,
    sample_scene,
)
from data_recipes.shapes_prompts import make_prompt
from data_recipes.shapes_text import (
    TAGS,
    caption_request,
    captions,
    chat,
    class_labels,
    distinct_vqa_items,
    existence_item,
    vqa_dialogue,
    vqa_items,
)

FORMAT = "dualtoken-shapes"
VERSION = 2  # 2: the training VQA record is a multi-turn conversation
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_HELDOUT: tuple[tuple[str, str], ...] = (("red", "star"), ("blue", "triangle"), ("green", "cross"))
SPLIT_FILES: dict[str, str] = {
    "images": "images",
    "scenes": "scenes.jsonl",
    "llava": "llava.json",
    "captions": "captions.json",
    "vqa_questions": "vqa_questions.json",
    "vqa_annotations": "vqa_annotations.json",
    "prompts": "prompts.jsonl",
}
VQA_PER_IMAGE = 3  # two of (color, shape, count, position) plus one existence question
MIN_SIZE = 16
_CHUNK = 200


@dataclass(frozen=True)
class PlannedScene:
    """One scene of the dataset before rendering: where it goes and, for prompt scenes, the prompt it satisfies."""

    image_id: int
    split: str
    index_in_split: int
    scene: Scene
    heldout: bool
    prompt: dict[str, Any] | None


@dataclass(frozen=True)
class _Job:
    root: str
    size: int
    seed: int
    allowed_pairs: tuple[tuple[str, str], ...]
    scenes: tuple[PlannedScene, ...]


def _split_quotas(n: int, fractions: Sequence[float]) -> dict[str, int]:
    if len(fractions) != 3 or any(not isinstance(f, int | float) or f < 0 for f in fractions):
        raise ValueError(f"split_fractions: expected three non-negative numbers, got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"split_fractions: must sum to 1 with a positive train share, got {fractions!r}")
    quotas = {"val": round(n * fractions[1]), "test": round(n * fractions[2])}
    for split, fraction in zip(("val", "test"), fractions[1:]):
        if fraction > 0:
            quotas[split] = max(1, quotas[split])
    quotas = {"train": n - quotas["val"] - quotas["test"], **quotas}
    if quotas["train"] < 1:
        raise ValueError(f"n: {n} scenes are too few for split fractions {tuple(fractions)}")
    return quotas


def _scene_split(seed: int, scene: Scene, fractions: Sequence[float]) -> str:
    """The split a scene belongs to, a pure function of its content (so splits are disjoint by scene)."""
    key = json.dumps(scene.to_dict(), sort_keys=True)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _with_heldout_pair(rng: random.Random, heldout: Sequence[tuple[str, str]]) -> Scene:
    scene = sample_scene(rng)
    objects = list(scene.objects)
    index = rng.randrange(len(objects))
    color, shape = rng.choice(heldout)
    old = objects[index]
    objects[index] = ShapeObject(shape, color, old.size, old.row, old.col)
    return Scene(tuple(objects))


def plan_scenes(
    n: int,
    seed: int = 0,
    heldout_pairs: Sequence[tuple[str, str]] = DEFAULT_HELDOUT,
    split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
) -> list[PlannedScene]:
    """Choose every scene of the dataset (no rendering): image ids in split order train, val, test."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"n: expected an integer >= 3 scenes, got {n!r}")
    quotas = _split_quotas(n, split_fractions)
    heldout = normalize_pairs(heldout_pairs, "heldout_pairs") if heldout_pairs else []
    allowed = [pair for pair in ALL_PAIRS if pair not in set(heldout)]
    if len(allowed) < len(ALL_PAIRS) // 2:
        raise ValueError(
            f"heldout_pairs: {len(heldout)} pairs leave too few of the {len(ALL_PAIRS)} to train on"
        )
    n_heldout = quotas["test"] // 2 if heldout else 0
    wanted = {"train": quotas["train"], "val": quotas["val"], "test": quotas["test"] - n_heldout}
    chosen: dict[str, list[tuple[Scene, dict | None, bool]]] = {split: [] for split in SPLITS}
    limit = 100 * n + 10_000
    for candidate in count():
        if all(len(chosen[split]) >= wanted[split] for split in SPLITS):
            break
        if candidate >= limit:
            raise RuntimeError(f"could not fill the splits {wanted} after {limit} candidate scenes")
        rng = random.Random(f"shapes:{seed}:candidate:{candidate}")
        if candidate % 2 == 0:
            prompt, scene = make_prompt(rng, TAGS[(candidate // 2) % len(TAGS)], allowed)
        else:
            prompt, scene = None, sample_scene(rng, allowed)
        split = _scene_split(seed, scene, split_fractions)
        if len(chosen[split]) < wanted[split]:
            chosen[split].append((scene, prompt, False))
    for index in range(n_heldout):
        rng = random.Random(f"shapes:{seed}:heldout:{index}")
        if index % 2 == 0:
            prompt, scene = make_prompt(
                rng, TAGS[(index // 2) % len(TAGS)], ALL_PAIRS, required_pairs=heldout
            )
        else:
            prompt, scene = None, _with_heldout_pair(rng, heldout)
        chosen["test"].append((scene, prompt, True))
    planned: list[PlannedScene] = []
    for split in SPLITS:
        for index_in_split, (scene, prompt, is_heldout) in enumerate(chosen[split]):
            planned.append(PlannedScene(len(planned), split, index_in_split, scene, is_heldout, prompt))
    return planned


def _image_file(image_id: int) -> str:
    return f"images/{image_id:07d}.png"


def _vqa_subset(planned: PlannedScene, rng: random.Random, allowed: Sequence[tuple[str, str]]) -> list[dict]:
    """Two non-existence questions and one existence question, 'yes' for even scenes of a split and 'no' for odd
    ones (falling back to the other answer when impossible), so yes/no answers stay balanced."""
    items = [item for item in vqa_items(planned.scene, rng, allowed) if item["question_type"] != "existence"]
    picked = rng.sample(items, min(VQA_PER_IMAGE - 1, len(items)))
    want_yes = planned.index_in_split % 2 == 0
    existence = existence_item(planned.scene, rng, want_yes, allowed)
    if existence is None:
        existence = existence_item(planned.scene, rng, not want_yes, allowed)
    return picked + ([existence] if existence is not None else [])


def _training_vqa(scene, rng: random.Random, allowed: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The VQA conversation of a training record: every distinct question of two `vqa_items` rounds about the scene
    (about six to eight, each question type and both existence answers), one short answer per turn."""
    return vqa_dialogue(distinct_vqa_items(scene, rng, 2, allowed))


def _build_records(planned: PlannedScene, seed: int, size: int, allowed: Sequence[tuple[str, str]]) -> dict:
    """Every text record of one scene (deterministic in seed and image id)."""
    rng = random.Random(f"shapes:{seed}:text:{planned.image_id}")
    image_id, file = planned.image_id, _image_file(planned.image_id)
    text_pairs = ALL_PAIRS if planned.heldout else allowed
    questions = _vqa_subset(planned, rng, text_pairs)
    llava = [
        {"id": f"{image_id}-caption", "image": file, "conversations": caption_request(planned.scene, rng)},
        {
            "id": f"{image_id}-vqa",
            "image": file,
            "conversations": _training_vqa(planned.scene, rng, text_pairs),
        },
        {"id": f"{image_id}-chat", "image": file, "conversations": chat(planned.scene, rng, text_pairs)},
    ]
    vqa_questions, vqa_annotations = [], []
    for k, item in enumerate(questions):
        question_id = image_id * 10 + k
        vqa_questions.append({"question_id": question_id, "image_id": image_id, "question": item["question"]})
        vqa_annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "question_type": item["question_type"],
                "answer_type": item["answer_type"],
                "multiple_choice_answer": item["answer"],
                "answers": [
                    {"answer": item["answer"], "answer_confidence": "yes", "answer_id": answer_id}
                    for answer_id in range(1, 11)
                ],
            }
        )
    caption_annotations = [
        {"id": image_id * 10 + k, "image_id": image_id, "caption": caption}
        for k, caption in enumerate(captions(planned.scene))
    ]
    return {
        "scene": {
            "image_id": image_id,
            "file": file,
            "heldout": planned.heldout,
            "scene": planned.scene.to_dict(),
        },
        "image": {"id": image_id, "file_name": file, "width": size, "height": size},
        "captions": caption_annotations,
        "llava": llava,
        "vqa_questions": vqa_questions,
        "vqa_annotations": vqa_annotations,
        "prompt": planned.prompt,
    }


def _run_job(job: _Job) -> list[dict]:
    """Render and write the PNGs of a chunk of scenes; return their text records."""
    results = []
    for planned in job.scenes:
        path = Path(job.root) / planned.split / _image_file(planned.image_id)
        render(planned.scene, job.size).save(path, format="PNG")
        results.append(_build_records(planned, job.seed, job.size, job.allowed_pairs))
    return results


def _write_json(path: Path, payload: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, separators=(",", ":"))


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")


def _write_split(
    split_dir: Path, split: str, records: Sequence[dict], heldout: set, first_prompt_id: int
) -> int:
    """Write the text files of one split; return the number of prompts written."""
    _write_jsonl(split_dir / SPLIT_FILES["scenes"], [r["scene"] for r in records])
    _write_json(split_dir / SPLIT_FILES["llava"], [entry for r in records for entry in r["llava"]])
    _write_json(
        split_dir / SPLIT_FILES["captions"],
        {"images": [r["image"] for r in records], "annotations": [a for r in records for a in r["captions"]]},
    )
    vqa_header = {
        "data_type": "shapes",
        "data_subtype": split,
        "license": {},
        "info": {"description": FORMAT},
    }
    _write_json(
        split_dir / SPLIT_FILES["vqa_questions"],
        {
            **vqa_header,
            "task_type": "OpenEnded",
            "questions": [q for r in records for q in r["vqa_questions"]],
        },
    )
    _write_json(
        split_dir / SPLIT_FILES["vqa_annotations"],
        {**vqa_header, "annotations": [a for r in records for a in r["vqa_annotations"]]},
    )
    prompts = []
    for r in records:
        if r["prompt"] is None:
            continue
        scene_pairs = {(o["color"], o["shape"]) for o in r["scene"]["scene"]["objects"]}
        prompts.append(
            {
                "prompt_id": first_prompt_id + len(prompts),
                **r["prompt"],
                "image_id": r["scene"]["image_id"],
                "file": r["scene"]["file"],
                "heldout": bool(scene_pairs & heldout),
            }
        )
    _write_jsonl(split_dir / SPLIT_FILES["prompts"], prompts)
    return len(prompts)


def _manifest(
    n: int,
    size: int,
    seed: int,
    heldout: Sequence[tuple[str, str]],
    split_fractions: Sequence[float],
    planned: Sequence[PlannedScene] | None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "size": size,
        "n": n,
        "split_fractions": [float(f) for f in split_fractions],
        "heldout_pairs": [list(pair) for pair in heldout],
        "shapes": list(SHAPES),
        "colors": list(COLOR_NAMES),
        "files": {split: {key: f"{split}/{name}" for key, name in SPLIT_FILES.items()} for split in SPLITS},
    }
    if planned is not None:
        manifest["splits"] = {split: sum(p.split == split for p in planned) for split in SPLITS}
        manifest["heldout_scenes"] = {
            split: sum(p.split == split and p.heldout for p in planned) for split in SPLITS
        }
    return manifest


def _same_request(existing: dict[str, Any], requested: dict[str, Any]) -> bool:
    keys = ("format", "version", "seed", "size", "n", "split_fractions", "heldout_pairs", "shapes", "colors")
    return all(existing.get(key) == requested[key] for key in keys)


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 64,
    seed: int = 0,
    heldout_pairs: Sequence[tuple[str, str]] = DEFAULT_HELDOUT,
    split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
    workers: int = 2,
    force: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Render `n` scenes at `size` px with all their text into `out_dir`; return the manifest.

    An `out_dir` that already holds this very dataset (same manifest request) is left as is; one holding
    anything else is replaced only with `force`.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size: expected an integer >= {MIN_SIZE} pixels, got {size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected a non-negative integer, got {workers!r}")
    out = Path(out_dir)
    heldout = normalize_pairs(heldout_pairs, "heldout_pairs") if heldout_pairs else []
    requested = _manifest(n, size, seed, heldout, split_fractions, None)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir: {out} exists and is not a directory")
        existing = _existing_manifest(out)
        if existing is not None and not force and _same_request(existing, requested):
            if verbose:
                print(f"{out} already holds this shapes dataset (seed {seed}, {n} scenes at {size} px)")
            return existing
        if any(out.iterdir()) and not force:
            raise ValueError(
                f"out_dir: {out} is not empty and does not hold this dataset; pass --force (force=True) to replace it"
            )
    start = time.perf_counter()
    planned = plan_scenes(n, seed, heldout, split_fractions)
    allowed = tuple(pair for pair in ALL_PAIRS if pair not in set(heldout))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        for split in SPLITS:
            (tmp / split / "images").mkdir(parents=True)
        jobs = [
            _Job(str(tmp), size, seed, allowed, tuple(planned[i : i + _CHUNK]))
            for i in range(0, len(planned), _CHUNK)
        ]
        records: list[dict] = []
        with tqdm(total=len(planned), unit="scene", desc="shapes", disable=not verbose) as bar:
            if workers <= 1:
                for job in jobs:
                    records += _run_job(job)
                    bar.update(len(job.scenes))
            else:
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    for job, result in zip(jobs, pool.imap(_run_job, jobs)):
                        records += result
                        bar.update(len(job.scenes))
        prompt_count = 0
        for split in SPLITS:
            split_records = [r for r, p in zip(records, planned) if p.split == split]
            prompt_count += _write_split(tmp / split, split, split_records, set(heldout), prompt_count)
        _write_json(
            tmp / "classes.json",
            {"classes": class_labels(), "colors": list(COLOR_NAMES), "shapes": list(SHAPES)},
        )
        manifest = _manifest(n, size, seed, heldout, split_fractions, planned)
        with (tmp / "manifest.json").open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    if verbose:
        print(f"wrote {n} scenes ({size} px) to {out} in {elapsed:.1f} s: {n / elapsed:.0f} scenes/s")
    return manifest


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    if text.strip().lower() in ("", "none"):
        return []
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise ValueError(
                f"--heldout: expected color:shape items separated by commas, got {item.strip()!r}"
            )
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def _run_cli(args) -> int:
    try:
        heldout = DEFAULT_HELDOUT if args.heldout is None else _parse_pairs(args.heldout)
        write_shapes_dataset(
            args.out,
            n=args.n,
            size=args.size,
            seed=args.seed,
            heldout_pairs=heldout,
            workers=args.workers,
            force=args.force,
        )
    except ValueError as error:
        print(f"dualtoken data shapes: error: {error}", file=sys.stderr)
        return 2
    return 0


def register(data_subparsers) -> None:
    """Add `dualtoken data shapes`."""
    parser = data_subparsers.add_parser("shapes", help="render the procedural shapes-world dataset")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--n", type=int, default=10_000, help="number of scenes over all splits (default 10000)"
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes (default 2; 0 or 1: in-process)"
    )
    parser.add_argument(
        "--heldout",
        default=None,
        help="held-out color:shape pairs, comma separated, or 'none' "
        f"(default {','.join(f'{c}:{s}' for c, s in DEFAULT_HELDOUT)})",
    )
    parser.add_argument("--force", action="store_true", help="replace a different dataset already in --out")
    parser.set_defaults(func=_run_cli)

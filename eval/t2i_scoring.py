"""GenEval-style text-to-image verification on the shapes world: per-sample verdicts and accuracy per tag.

Each generated image is parsed back into a scene (`data_recipes.scene_parser.parse_scene` by default) and the
prompt spec is checked against it (`data_recipes.shapes_prompts.prompt_satisfied` by default). Accuracy is the
fraction of satisfied samples per tag; "overall" is the mean over the tags present (GenEval's task average),
reported for all prompts, for the held-out prompts and for the seen (not held-out) ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

T2I_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPEC_FIELDS: tuple[str, ...] = ("prompt_id", "prompt", "tag", "heldout")

ParseFn = Callable[[Any], Any]
CheckFn = Callable[[Mapping[str, Any], Any], bool]


@dataclass(frozen=True)
class T2IVerdict:
    """Whether one generated image satisfies its prompt."""

    prompt_id: str
    prompt: str
    tag: str
    heldout: bool
    satisfied: bool


def validate_prompt_spec(spec: Any, where: str) -> None:
    """Raise ValueError naming `where` and the field when `spec` is not a valid prompt spec."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: prompt spec must be a JSON object, got {type(spec).__name__}")
    for key in SPEC_FIELDS:
        if key not in spec:
            raise ValueError(f"{where}: prompt spec lacks the field '{key}'")
    if not isinstance(spec["prompt"], str):
        raise ValueError(f"{where}: field 'prompt' must be a string")
    if spec["tag"] not in T2I_TAGS:
        raise ValueError(f"{where}: field 'tag' is {spec['tag']!r}, expected one of {', '.join(T2I_TAGS)}")
    if not isinstance(spec["heldout"], bool):
        raise ValueError(f"{where}: field 'heldout' must be true or false, got {spec['heldout']!r}")


def load_prompt_specs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate a prompts.jsonl file (one prompt spec per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    specs: list[dict[str, Any]] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON: {error}") from None
            validate_prompt_spec(spec, f"{path}:{line_number}")
            specs.append(spec)
    if not specs:
        raise ValueError(f"{path}: no prompt specs")
    return specs


def _default_parse_fn() -> ParseFn:
    from data_recipes.scene_parser import parse_scene

    return parse_scene


def _default_check_fn() -> CheckFn:
    from data_recipes.shapes_prompts import prompt_satisfied

    return prompt_satisfied


def summarize_verdicts(verdicts: Sequence[T2IVerdict]) -> dict[str, Any] | None:
    """Accuracy per tag, their mean ("overall"), the sample count and the tags with no samples; None if empty."""
    if not verdicts:
        return None
    per_tag: dict[str, float] = {}
    counts: dict[str, int] = {}
    for tag in T2I_TAGS:
        tagged = [v.satisfied for v in verdicts if v.tag == tag]
        if tagged:
            per_tag[tag] = sum(tagged) / len(tagged)
            counts[tag] = len(tagged)
    return {
        "overall": sum(per_tag.values()) / len(per_tag),
        "per_tag": per_tag,
        "samples_per_tag": counts,
        "num_samples": len(verdicts),
        "missing_tags": [tag for tag in T2I_TAGS if tag not in per_tag],
    }


def score_t2i(
    specs: Sequence[Mapping[str, Any]],
    images: Sequence[Any],
    parse_fn: ParseFn | None = None,
    check_fn: CheckFn | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Verify images[i] against specs[i] (repeat a spec for several samples of one prompt).

    Returns {"per_sample": [verdict dicts], "all": summary, "heldout": summary or None, "seen": summary or None},
    each summary as `summarize_verdicts` builds it.
    """
    if len(specs) != len(images):
        raise ValueError(f"got {len(specs)} prompt specs but {len(images)} images; they must pair one to one")
    if not specs:
        raise ValueError("no samples to score")
    for index, spec in enumerate(specs):
        validate_prompt_spec(spec, f"specs[{index}]")
    parse = parse_fn if parse_fn is not None else _default_parse_fn()
    check = check_fn if check_fn is not None else _default_check_fn()
    verdicts: list[T2IVerdict] = []
    pairs = tqdm(zip(specs, images), total=len(specs), desc="t2i verify", disable=not show_progress)
    for spec, image in pairs:
        scene = parse(image)
        satisfied = check(spec, scene)
        if satisfied not in (True, False):
            raise ValueError(
                f"check function returned {satisfied!r} for prompt {spec['prompt_id']!r}, expected a bool"
            )
        verdicts.append(
            T2IVerdict(
                prompt_id=str(spec["prompt_id"]),
                prompt=spec["prompt"],
                tag=spec["tag"],
                heldout=spec["heldout"],
                satisfied=bool(satisfied),
            )
        )
    return {
        "per_sample": [asdict(v) for v in verdicts],
        "all": summarize_verdicts(verdicts),
        "heldout": summarize_verdicts([v for v in verdicts if v.heldout]),
        "seen": summarize_verdicts([v for v in verdicts if not v.heldout]),
    }

"""lmms-eval hooks of the `shapes_vqa` task: the image of a record, its prompt text and its VQAv2 soft score.

lmms-eval loads this file by path (`!function utils.doc_to_visual` in `shapes_vqa_template.yaml`), so it uses
absolute imports only. The prompt is the question plus the project's short-answer suffix, the text `dualtoken eval
vqa` asks with; the model adapter puts the `<image>` placeholder in front, and the processor's chat template does
the rest.
"""

from __future__ import annotations

from typing import Any

from data_recipes.image_io import load_image
from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX
from eval.vqa_accuracy import vqa_score


def doc_to_visual(doc: dict[str, Any]) -> list:
    """The record's image, loaded through the project's safe loader (8-bit RGB)."""
    return [load_image(doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """`pre_prompt + question + post_prompt`; the post prompt defaults to the short-answer suffix."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', SHORT_ANSWER_SUFFIX)}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """VQAv2 soft accuracy in percent (official answer normalization, 10-annotator leave-one-out score)."""
    if len(results) != 1:
        raise ValueError(
            f"shapes_vqa: question {doc.get('question_id')} got {len(results)} replies; expected exactly one"
        )
    return {"vqa_accuracy": 100.0 * vqa_score(results[0], list(doc["answers"]))}

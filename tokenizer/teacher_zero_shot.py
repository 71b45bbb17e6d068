"""Zero-shot color x shape classification with the tiny teacher's text tower: the 48 class prompts, the
single-object image set of a split, scores for all / seen / held-out pairs, and their zero_shot_<split>.json file.
`image_features` lets the DualToken semantic path be scored against the same text features."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, SiglipModel

from data_recipes.atomic_io import atomic_write_text
from data_recipes.shapes import COLOR_NAMES, SHAPES, SIZES
from data_recipes.shapes_text import POSITION_PHRASES
from tokenizer.teacher_data import encode_texts, load_images, load_scenes, to_pixel_values
from tokenizer.text_tokenizer import load_text_tokenizer, transformers_errors_only

ZERO_SHOT_NAME = "zero_shot_{split}.json"


# ---------------------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def text_embeddings(
    model: SiglipModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised text features (N, D) of the teacher's text tower."""
    length = model.config.text_config.max_position_embeddings
    ids = encode_texts(tokenizer, texts, length)
    chunks = [
        model.get_text_features(input_ids=ids[i : i + batch_size]).pooler_output
        for i in range(0, len(ids), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


@torch.no_grad()
def image_embeddings(model: SiglipModel, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised pooled image features (N, D) of the teacher's vision tower; `pixel_values` in [-1, 1]."""
    chunks = [
        model.get_image_features(pixel_values=pixel_values[i : i + batch_size]).pooler_output
        for i in range(0, len(pixel_values), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


# ---------------------------------------------------------------------------------------------------- zero-shot
def class_pairs() -> list[tuple[str, str]]:
    """(color, shape) per zero-shot class, in the order of `class_labels()` (color-major)."""
    return [(color, shape) for color in COLOR_NAMES for shape in SHAPES]


@dataclass(frozen=True)
class ZeroShotSet:
    """Single-object images of a split with their class index and whether their pair is held out."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    heldout: torch.Tensor  # bool (N,)


def single_object_set(
    dataset_dir: str | os.PathLike, split: str = "test", image_size: int = 64
) -> ZeroShotSet:
    """Every image of `split` holding exactly one object, labelled with its (color, shape) class."""
    root = Path(dataset_dir)
    index = {pair: i for i, pair in enumerate(class_pairs())}
    scenes = [s for s in load_scenes(root, split) if len(s["scene"]["objects"]) == 1]
    if not scenes:
        raise ValueError(f"{root}/{split}: no single-object scene to evaluate zero-shot on")
    labels = [index[(s["scene"]["objects"][0]["color"], s["scene"]["objects"][0]["shape"])] for s in scenes]
    images = load_images(root / split, [s["file"] for s in scenes], image_size)
    return ZeroShotSet(images, torch.tensor(labels), torch.tensor([bool(s["heldout"]) for s in scenes]))


def _accuracies(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    n_shapes = len(SHAPES)
    return {
        "n": int(len(labels)),
        "top1": float((predicted == labels).float().mean()) if len(labels) else float("nan"),
        "color": float((predicted // n_shapes == labels // n_shapes).float().mean())
        if len(labels)
        else float("nan"),
        "shape": float((predicted % n_shapes == labels % n_shapes).float().mean())
        if len(labels)
        else float("nan"),
    }


def class_prompts() -> list[list[str]]:
    """Prompts per template (outer) and class (inner, `class_pairs()` order): the class name 'red circle' in the
    training captions' phrasing with each size and grid position, 'A small red circle in the top left corner.'.
    The bare label ('a red circle') is out of the captions' distribution: captions always state size and position,
    and the pooled image feature encodes them strongly, so a class scores its best-matching template instead."""
    return [
        [f"A {size} {color} {shape} {where}." for color, shape in class_pairs()]
        for size in SIZES
        for where in POSITION_PHRASES.values()
    ]


def class_text_features(model: SiglipModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Normalised text features (templates, 48 classes, D) of `class_prompts()`."""
    prompts = class_prompts()
    flat = text_embeddings(model, tokenizer, [p for template in prompts for p in template])
    return flat.view(len(prompts), len(prompts[0]), -1)


def class_scores(image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """(N, classes) scores: cosine to each class, the best over its templates when `class_features` is
    (templates, classes, D); plain cosine when it is (classes, D)."""
    if class_features.ndim == 2:
        return image_features @ class_features.T
    return torch.einsum("nd,tkd->ntk", image_features, class_features).amax(dim=1)


def zero_shot_scores(
    image_features: torch.Tensor, class_features: torch.Tensor, data: ZeroShotSet
) -> dict[str, Any]:
    """Top-1 over the 48 classes and per-attribute accuracy (the predicted class's color / shape), for all
    single-object images and separately for seen and held-out pairs."""
    predicted = class_scores(image_features, class_features).argmax(dim=-1)
    classes = class_features.shape[-2]
    seen = ~data.heldout
    return {
        "classes": classes,
        "chance": 1.0 / classes,
        "templates": class_features.shape[0] if class_features.ndim == 3 else 1,
        "all": _accuracies(predicted, data.labels),
        "seen": _accuracies(predicted[seen], data.labels[seen]),
        "heldout": _accuracies(predicted[data.heldout], data.labels[data.heldout]),
    }


def load_teacher(teacher_dir: str | os.PathLike) -> tuple[SiglipModel, PreTrainedTokenizerBase]:
    """The teacher SiglipModel (eval mode) and its text tokenizer from a teacher directory."""
    path = Path(teacher_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_teacher: {path} has no config.json (not a teacher directory)")
    with transformers_errors_only():
        model = SiglipModel.from_pretrained(path)
    return model.eval(), load_text_tokenizer(path)


def zero_shot_eval(
    teacher_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    image_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Zero-shot color x shape classification of the single-object images of `split` with the teacher's text tower.

    `image_features` maps pixel values (B, 3, H, W) in [-1, 1] to pooled features (B, D); by default the teacher's
    own vision tower (pass e.g. the DualToken semantic path to score it against the same text features).
    """
    model, tokenizer = load_teacher(teacher_dir)
    data = single_object_set(dataset_dir, split, model.config.vision_config.image_size)
    pixels = to_pixel_values(data.images)
    if image_features is None:
        features = image_embeddings(model, pixels)
    else:
        with torch.no_grad():
            features = torch.nn.functional.normalize(image_features(pixels).float(), dim=-1)
    return {"split": split, **zero_shot_scores(features, class_text_features(model, tokenizer), data)}


def write_zero_shot(teacher_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Store a zero-shot result next to the teacher as zero_shot_<split>.json (atomic file replace)."""
    path = Path(teacher_dir) / ZERO_SHOT_NAME.format(split=result["split"])
    return atomic_write_text(path, json.dumps(result, indent=2) + "\n")

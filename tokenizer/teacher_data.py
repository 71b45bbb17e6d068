"""Shapes-world reading for the tiny teacher: a split's scenes, images (uint8 tensors) and captions through the
dataset's manifest, SigLIP pixel normalisation and the text tower's fixed-length token ids. Errors name the file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] (SigLIP normalisation, mean = std = 0.5)."""
    return images.float().div_(127.5).sub_(1.0)


def split_files(dataset_dir: Path, split: str) -> dict[str, str]:
    try:
        manifest = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{dataset_dir / 'manifest.json'}: cannot read a shapes-world manifest ({error})"
        ) from error
    files = manifest.get("files", {}).get(split)
    if not isinstance(files, dict):
        raise ValueError(f"{dataset_dir / 'manifest.json'}: no files listed for split {split!r}")
    return files


def load_scenes(dataset_dir: Path, split: str) -> list[dict]:
    path = dataset_dir / split_files(dataset_dir, split)["scenes"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_images(split_dir: Path, files: Sequence[str], size: int) -> torch.Tensor:
    """The images as one uint8 (N, 3, size, size) tensor (RGB; resized with bicubic when the side differs)."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for index, name in enumerate(files):
        path = split_dir / name
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BICUBIC)
                out[index] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        except OSError as error:
            raise ValueError(f"{path}: cannot read image ({error})") from error
    return out


def load_captions(dataset_dir: Path, split: str) -> tuple[list[str], list[list[str]], list[list[dict]]]:
    """(image files, captions per image, objects per image), images in scenes.jsonl order."""
    files = split_files(dataset_dir, split)
    scenes = load_scenes(dataset_dir, split)
    payload = json.loads((dataset_dir / files["captions"]).read_text(encoding="utf-8"))
    by_image: dict[int, list[str]] = {}
    for annotation in sorted(payload["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    image_files, captions, objects = [], [], []
    for scene in scenes:
        texts = by_image.get(scene["image_id"])
        if not texts:
            raise ValueError(f"{dataset_dir / files['captions']}: image {scene['image_id']} has no caption")
        image_files.append(scene["file"])
        captions.append(texts)
        objects.append(scene["scene"]["objects"])
    return image_files, captions, objects


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids (N, max_length), padded with the pad id and truncated, as the teacher's text tower reads them."""
    return tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids


def has_split(root: Path, split: str) -> bool:
    """Whether the dataset at `root` lists `split` and its scenes file exists."""
    try:
        return (root / split_files(root, split)["scenes"]).is_file()
    except ValueError:
        return False

"""Training data of MLLM instruction tuning: LLaVA conversations and text-to-image prompts over a code store.

`MLLMTrainingData` is a map-style dataset, so the HF Trainer owns order, sharding across ranks and the resume
position (it skips the batches a checkpoint already consumed). Everything random in an item is a pure function
of (seed, epoch, index): the caption-dropout draw of a T2I item, and the length-grouped order of
`SeededLengthGroupedSampler`; a resumed run therefore sees exactly the batches the uninterrupted one would.
(The epoch reaches the dataset and the sampler through their `set_epoch`, called by `MLLMTrainer` before each epoch,
resumed ones included, not by the DataLoader: accelerate's batch-skipping loader of a resumed epoch would not pass it
on. Workers copy the dataset when they start, so persistent DataLoader workers would keep epoch 0's draws: leave
`dataloader_persistent_workers` off.)

Sources:
- LLaVA JSON: a list of {"image": path | [paths] (optional), "conversations": [{"from": "human"|"gpt"|"system",
  "value": text with <image> placeholders}, ...]};
- prompts JSONL: one {"prompt" | "caption": text, "image_id": int | "image" | "file": path} per line (the image
  the caption describes, drawn by the assistant).
Image codes come from a `CodeStore`, keyed by `data_recipes.code_shards.image_key` of the record's reference.
Every example is formatted by the processor (`training_example` / `t2i_example`), which puts the loss on
assistant answers and output-image codes only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from data_recipes.code_shards import CodeStore, image_key
from mllm.processor import DualTokenProcessor, MultimodalExample

LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
CAPTION_FIELDS = ("prompt", "caption", "text")
CHAT, T2I = "chat", "t2i"
# Length estimate for grouping (exact lengths would mean tokenizing the whole corpus at start-up).
CHARS_PER_TOKEN = 3.0


def load_llava(path: str | os.PathLike) -> list[dict]:
    """Read and check a LLaVA conversation JSON file."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"LLaVA file {path}: cannot read JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"LLaVA file {path}: expected a JSON list of records, got {type(records).__name__}")
    for number, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"LLaVA file {path}: record {number} has no 'conversations' list")
        for turn in turns:
            if (
                not isinstance(turn, dict)
                or turn.get("from") not in LLAVA_ROLES
                or not isinstance(turn.get("value"), str)
            ):
                raise ValueError(
                    f"LLaVA file {path}: record {number} has a turn {turn!r}; expected "
                    f"{{'from': one of {sorted(LLAVA_ROLES)}, 'value': str}}"
                )
    return records


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """Read and check a prompts JSONL file (caption + image reference per line)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"prompts file {path}:{line_number}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not any(
                isinstance(record.get(k), str) for k in CAPTION_FIELDS
            ):
                raise ValueError(
                    f"prompts file {path}:{line_number}: needs a caption field, one of {CAPTION_FIELDS}"
                )
            if prompt_image_ref(record) is None:
                raise ValueError(f"prompts file {path}:{line_number}: needs an 'image_id', 'image' or 'file'")
            records.append(record)
    return records


def prompt_caption(record: dict) -> str:
    return next(record[k] for k in CAPTION_FIELDS if isinstance(record.get(k), str))


def prompt_image_ref(record: dict) -> int | str | None:
    for key in ("image", "file", "image_id"):
        if record.get(key) is not None:
            return record[key]
    return None


def llava_image_refs(record: dict) -> list:
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def llava_messages(record: dict) -> list[dict]:
    """LLaVA turns -> processor messages ({"role", "content"})."""
    return [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]


def caption_dropped(seed: int, epoch: int, index: int, probability: float) -> bool:
    """The caption-dropout draw of dataset item `index` in `epoch` (independent of any global RNG state)."""
    if probability <= 0.0:
        return False
    return bool(np.random.default_rng([seed, epoch, index]).random() < probability)


def _repeat(count: int, factor: float, rng: np.random.Generator) -> list[int]:
    """Indices 0..count-1 repeated `factor` times (a fractional part picks a seeded random subset)."""
    if factor < 0:
        raise ValueError(f"source repeat factor must be >= 0, got {factor}")
    whole = int(math.floor(factor))
    out = list(range(count)) * whole
    extra = round((factor - whole) * count)
    if extra:
        out += sorted(rng.choice(count, size=extra, replace=False).tolist())
    return out


def truncate_example(
    example: MultimodalExample, max_length: int, boi_id: int, eoi_id: int
) -> MultimodalExample:
    """Cut an example to `max_length` positions without splitting an image: a cut inside <boi>..<eoi> moves to
    just before that <boi>, and the codes of the dropped images go with it."""
    if len(example.input_ids) <= max_length:
        return example
    cut = max_length
    kept_images = 0
    start = None
    for position, token in enumerate(example.input_ids):
        if position >= cut and start is None:
            break
        if token == boi_id:
            start = position
        elif token == eoi_id and start is not None:
            if position < cut:
                kept_images += 1
            else:  # the image straddles the cut
                cut = start
            start = None
    pixel = example.pixel_codes[:kept_images] if kept_images else None
    semantic = example.semantic_codes[:kept_images] if kept_images else None
    return MultimodalExample(
        example.input_ids[:cut],
        example.labels[:cut],
        pixel,
        semantic,
        example.image_is_output[:kept_images],
    )


@dataclass(frozen=True)
class Item:
    kind: str  # CHAT or T2I
    record: int


class MLLMTrainingData(Dataset):
    """Chat and T2I records mixed into one indexable dataset; items are `MultimodalExample`s.

    `conversation_repeat` / `prompt_repeat` weight the two sources (2.0 lists each record twice, 0.5 a seeded
    half). Records whose images are missing from the store raise, or are dropped with `skip_missing_images`.
    """

    def __init__(
        self,
        processor: DualTokenProcessor,
        store: CodeStore | None,
        conversations: Sequence[dict] = (),
        prompts: Sequence[dict] = (),
        *,
        caption_dropout: float = 0.0,
        seed: int = 0,
        max_length: int | None = None,
        conversation_repeat: float = 1.0,
        prompt_repeat: float = 1.0,
        skip_missing_images: bool = False,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1], got {caption_dropout}")
        self.processor = processor
        self.store = store
        self.conversations = list(conversations)
        self.prompts = list(prompts)
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.max_length = max_length
        self.epoch = 0
        self.skipped_missing = 0
        grid = processor.settings.grid_size or 0
        self.cells = grid * grid
        rng = np.random.default_rng(seed)
        items = [Item(CHAT, i) for i in _repeat(len(self.conversations), conversation_repeat, rng)]
        items += [Item(T2I, i) for i in _repeat(len(self.prompts), prompt_repeat, rng)]
        self.items = [item for item in items if self._images_available(item, skip_missing_images)]
        if not self.items:
            raise ValueError(
                "MLLMTrainingData: no training examples (empty sources, or every image is missing)"
            )
        self.lengths = [self._estimated_length(item) for item in self.items]

    def _image_keys(self, item: Item) -> list[int]:
        if item.kind == CHAT:
            return [image_key(ref) for ref in llava_image_refs(self.conversations[item.record])]
        return [image_key(prompt_image_ref(self.prompts[item.record]))]

    def _images_available(self, item: Item, skip: bool) -> bool:
        keys = self._image_keys(item)
        if not keys:
            return True
        if self.store is None:
            raise ValueError("MLLMTrainingData: records reference images but no code store was given")
        missing = [k for k in keys if k not in self.store]
        if not missing:
            return True
        if not skip:
            record = self.conversations[item.record] if item.kind == CHAT else self.prompts[item.record]
            raise KeyError(
                f"MLLMTrainingData: the code store {self.store.directory} has no codes for the image(s) of "
                f"{item.kind} record {item.record} ({llava_image_refs(record) or prompt_image_ref(record)!r}); "
                "encode them first or set skip_missing_images"
            )
        self.skipped_missing += 1
        return False

    def _estimated_length(self, item: Item) -> int:
        if item.kind == CHAT:
            record = self.conversations[item.record]
            chars = sum(len(turn["value"]) for turn in record["conversations"])
            images, turns = len(llava_image_refs(record)), len(record["conversations"])
        else:
            chars, images, turns = len(prompt_caption(self.prompts[item.record])), 1, 2
        estimate = int(chars / CHARS_PER_TOKEN) + images * (self.cells + 2) + 4 * turns
        return min(estimate, self.max_length) if self.max_length else estimate

    def set_epoch(self, epoch: int) -> None:
        """Called by `MLLMTrainer` before each epoch (caption dropout draws depend on it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def is_caption_dropped(self, index: int) -> bool:
        return self.items[index].kind == T2I and caption_dropped(
            self.seed, self.epoch, index, self.caption_dropout
        )

    def __getitem__(self, index: int) -> MultimodalExample:
        item = self.items[index]
        codes = [self.store.get(key) for key in self._image_keys(item)] if self.store is not None else []
        if item.kind == CHAT:
            record = self.conversations[item.record]
            example = self.processor.training_example(llava_messages(record), codes)
        else:
            caption = prompt_caption(self.prompts[item.record])
            example = self.processor.t2i_example(
                caption, codes[0], drop_caption=self.is_caption_dropped(index)
            )
        if self.max_length:
            ids = self.processor.ids
            example = truncate_example(example, self.max_length, ids["boi_token_id"], ids["eoi_token_id"])
        return example


class MLLMCollator:
    """Right-pads a list of `MultimodalExample`s into model inputs through the processor."""

    def __init__(self, processor: DualTokenProcessor):
        self.processor = processor

    def __call__(self, examples: Sequence[MultimodalExample]) -> dict[str, torch.Tensor]:
        return self.processor.collate(examples, padding_side="right")


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose shuffle is seeded by (seed, epoch), so every rank and every resumed run
    draws the same order regardless of the global RNG."""

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int):
        super().__init__(batch_size, lengths=list(lengths), generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        return super().__iter__()


def build_training_data(
    processor: DualTokenProcessor,
    code_store: str | None,
    llava_files: Sequence[str],
    prompt_files: Sequence[str],
    **kwargs: Any,
) -> MLLMTrainingData:
    """Read the sources and the store named by the data arguments into an `MLLMTrainingData`."""
    store = CodeStore(code_store) if code_store else None
    if store is not None and processor.settings.grid_size is not None:
        if store.grid != (processor.settings.grid_size,) * 2 or store.depth != processor.settings.rq_depth:
            raise ValueError(
                f"code store {code_store} holds {store.grid} grids of depth {store.depth}; the model expects "
                f"{processor.settings.grid_size}x{processor.settings.grid_size} of depth {processor.settings.rq_depth}"
            )
    conversations = [record for path in llava_files for record in load_llava(path)]
    prompts = [record for path in prompt_files for record in load_prompts(path)]
    return MLLMTrainingData(processor, store, conversations, prompts, **kwargs)

"""Sequence-format helpers: the special token strings, the flat exchange format, padding and position ids.

Sequence layout (the processor is the only place prompts are formatted; these helpers only move ids around):

- a user writes ``<image>``; the processor expands it into ``<boi>`` + ``<img>`` x (h*w) + ``<eoi>``;
- every ``<img>`` position is one grid cell, filled in reading order (batch-major, then time) from the code grids;
- images the assistant produces use the same pattern inside the assistant turn (``image_is_output=True``).

Exchange format: one flat id list in the vocabulary ``[text | K pixel ids | K semantic ids]``, where each ``<img>``
position is written as its D pixel ids then its D semantic ids (`serialize` / `deserialize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX

IMAGE_PLACEHOLDER = "<image>"
BOI = "<boi>"
EOI = "<eoi>"
IMG = "<img>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
MULTIMODAL_SPECIALS = (IMAGE_PLACEHOLDER, BOI, EOI, IMG)
CHAT_SPECIALS = (TURN_START, TURN_END)
# Every string the text tokenizer must hold as one token (`tokenizer.text_tokenizer.train_text_tokenizer`'s
# `special_tokens`; `mllm.processor.ensure_special_tokens` adds those a pretrained tokenizer lacks).
SPECIAL_TOKENS = (*MULTIMODAL_SPECIALS, *CHAT_SPECIALS)
# Fixed prompt strings a tokenizer trained from scratch holds as one piece each, on top of SPECIAL_TOKENS: the chat
# turn headers (as `mllm.processor.CHAT_TEMPLATE` renders them) and LLaVA's short-answer instruction. SentencePiece
# merges neither across spaces nor around the turn markers, so spelled out the two headers take 4 + 8 tokens and the
# instruction 11 of the ~36 of a short-answer VQA turn. The tiny preset's text tokenizer is trained with them
# (`dualtoken mllm text-tokenizer`, the demo); a pretrained tokenizer keeps its own pieces.
PROMPT_PIECES = (
    *(f"{TURN_START}{role}\n" for role in ("system", "user", "assistant")),
    SHORT_ANSWER_SUFFIX,
)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ExchangeLayout:
    """Where the visual ids live in the exchange vocabulary."""

    img_token_id: int
    visual_token_offset: int
    codebook_size: int
    rq_depth: int

    @property
    def semantic_offset(self) -> int:
        return self.visual_token_offset + self.codebook_size

    @property
    def end(self) -> int:
        return self.visual_token_offset + 2 * self.codebook_size


def serialize(
    input_ids: Sequence[int] | torch.Tensor,
    pixel_codes: torch.Tensor | None,
    semantic_codes: torch.Tensor | None,
    layout: ExchangeLayout,
) -> list[int]:
    """One sequence (T,) with its images' codes (N,h,w,D) -> flat exchange ids.

    Every `<img>` position becomes its D pixel ids (offset + code) followed by its D semantic ids
    (offset + K + code), taking cells in reading order.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    is_cell = ids == layout.img_token_id
    cells = int(is_cell.sum())
    if cells == 0:
        return ids.tolist()
    if pixel_codes is None or semantic_codes is None:
        raise ValueError(f"serialize: the sequence has {cells} <img> positions but no codes were given")
    if pixel_codes.shape != semantic_codes.shape or pixel_codes.dim() != 4:
        raise ValueError(
            "serialize: pixel_codes and semantic_codes must both be (N,h,w,D), got "
            f"{tuple(pixel_codes.shape)} and {tuple(semantic_codes.shape)}"
        )
    depth = pixel_codes.shape[-1]
    if depth != layout.rq_depth:
        raise ValueError(f"serialize: codes have depth {depth}, the layout expects {layout.rq_depth}")
    pix = pixel_codes.reshape(-1, depth).long().cpu()
    sem = semantic_codes.reshape(-1, depth).long().cpu()
    if pix.shape[0] != cells:
        raise ValueError(f"serialize: {cells} <img> positions but the codes hold {pix.shape[0]} cells")
    for name, codes in (("pixel", pix), ("semantic", sem)):
        if codes.numel() and (codes.min() < 0 or codes.max() >= layout.codebook_size):
            raise ValueError(f"serialize: {name} codes must lie in [0, {layout.codebook_size})")
    cell_ids = torch.cat(
        [pix + layout.visual_token_offset, sem + layout.semantic_offset], dim=1
    )  # (cells, 2D)
    width = torch.where(is_cell, 2 * depth, 1)
    out = torch.empty(int(width.sum()), dtype=torch.long)
    starts = torch.cumsum(width, 0) - width
    out[starts[~is_cell]] = ids[~is_cell]
    cell_index = starts[is_cell].unsqueeze(1) + torch.arange(2 * depth)
    out[cell_index.flatten()] = cell_ids.flatten()
    return out.tolist()


def deserialize(
    flat_ids: Sequence[int] | torch.Tensor, layout: ExchangeLayout, grid_size: int
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Invert `serialize`: flat exchange ids -> (input_ids, pixel_codes (N,h,w,D), semantic_codes (N,h,w,D)).

    Raises ValueError when a cell is truncated, its ids are out of order (pixel then semantic) or out of range,
    or the number of cells is not a whole number of images.
    """
    flat = torch.as_tensor(flat_ids, dtype=torch.long).flatten()
    depth = layout.rq_depth
    if (flat >= layout.end).any() or (flat < 0).any():
        raise ValueError(f"deserialize: ids must lie in [0, {layout.end})")
    if (flat == layout.img_token_id).any():
        raise ValueError("deserialize: a flat exchange sequence must not contain bare <img> ids")
    visual = flat >= layout.visual_token_offset
    position = _position_in_run(visual)
    run_end = visual & ~torch.cat([visual[1:], torch.tensor([False])])
    if ((position[run_end] + 1) % (2 * depth)).any():
        raise ValueError(f"deserialize: a visual run is not a whole number of {2 * depth}-id cells")
    chunks = flat[visual].view(-1, 2 * depth)
    pix, sem = chunks[:, :depth] - layout.visual_token_offset, chunks[:, depth:] - layout.semantic_offset
    if (pix < 0).any() or (pix >= layout.codebook_size).any() or (sem < 0).any():
        raise ValueError("deserialize: each cell must hold D pixel ids followed by D semantic ids")
    cells_per_image = grid_size * grid_size
    if chunks.shape[0] % cells_per_image:
        raise ValueError(
            f"deserialize: {chunks.shape[0]} cells is not a whole number of {grid_size}x{grid_size} images"
        )
    # Keep every text id and the first id of each cell, which becomes that cell's <img> position.
    keep = ~visual | (position % (2 * depth) == 0)
    input_ids = torch.where(visual, layout.img_token_id, flat)[keep].tolist()
    shape = (chunks.shape[0] // cells_per_image, grid_size, grid_size, depth)
    return input_ids, pix.reshape(shape).contiguous(), sem.reshape(shape).contiguous()


def _position_in_run(mask: torch.Tensor) -> torch.Tensor:
    """For each True entry, its index inside its run of consecutive Trues (0 elsewhere)."""
    index = torch.arange(mask.numel())
    run_start = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
    start_index = torch.where(run_start, index, torch.zeros_like(index))
    start_of_run = torch.cummax(start_index, 0).values
    return torch.where(mask, index - start_of_run, torch.zeros_like(index))


def positions_from_mask(attention_mask: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Position ids from a (B, L) 0/1 mask: the cumulative count of real tokens minus one, 0 on padding.

    With `length`, return the last `length` columns (the new tokens when the mask also covers the cache).
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions if length is None else positions[:, -length:]


def pad_sequences(
    sequences: Sequence[Sequence[int] | torch.Tensor], pad_value: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id sequences to one (B, L) tensor; returns (padded, attention_mask). `side` is "left" or "right"."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_sequences: side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("pad_sequences: no sequences given")
    tensors = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    length = max(t.numel() for t in tensors)
    padded = torch.full((len(tensors), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(tensors), length), dtype=torch.long)
    for row, t in enumerate(tensors):
        span = slice(length - t.numel(), length) if side == "left" else slice(0, t.numel())
        padded[row, span] = t
        mask[row, span] = 1
    return padded, mask

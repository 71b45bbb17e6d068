"""Where a text-to-image model loses the caption: per-depth image losses under controlled inputs, and how much of
each depth's code is predictable from the scene at all.

- `image_loss_diagnostics`: the model's cross-entropy per head and per residual depth (nats per code) on images
  given as codes, with each image's own caption, with another prompt's caption (shifted by one), and with the LLM
  state that feeds the depth heads replaced by zeros or shuffled across the batch's cells. Own = shifted means the
  caption does not reach the heads; own = zero state means the heads do not use the LLM at all.
- `code_entropies`: per head and depth, the plug-in entropy of the codes (nats) marginally, given the cell's place,
  given what the cell shows (`data_recipes.cell_truth` class), and given both. The gap between the marginal and the
  conditional entropies is the part of a depth's loss that a caption-and-position-aware generator can remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

HEADS = ("pixel", "semantic")
CONDITIONS = ("own_caption", "shifted_caption", "zero_state", "shuffled_state")


def _per_depth_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(M, D, K) logits, (M, D) targets -> (D,) summed cross-entropy per depth."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape).sum(dim=0)


@torch.no_grad()
def image_loss_diagnostics(
    model, processor, captions: Sequence[str], codes: Sequence[Any], batch_size: int = 16, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """{head: {condition: [CE of depth 0, ..., depth D-1]}} for the conditions in `CONDITIONS`, on images given
    as (pixel, semantic) code grids `codes[i]` with captions `captions[i]` (at least two). Per-depth means over
    every cell of every image; full precision."""
    from mllm.generation import eval_mode

    if len(captions) != len(codes) or len(captions) < 2:
        raise ValueError(
            f"image_loss_diagnostics: need >= 2 captions paired with codes, got {len(captions)} and {len(codes)}"
        )
    heads = {name: getattr(model, f"{name}_head", None) for name in HEADS}
    heads = {name: head for name, head in heads.items() if head is not None}
    tables = {name: getattr(model, f"{name}_code_embedding") for name in heads}
    depth = model.config.rq_depth
    totals = {name: {c: torch.zeros(depth, dtype=torch.float64) for c in CONDITIONS} for name in heads}
    cells = 0
    generator = torch.Generator().manual_seed(seed)
    shifted = [*captions[1:], captions[0]]
    with eval_mode(model):
        for start in range(0, len(captions), batch_size):
            chunk = range(start, min(start + batch_size, len(captions)))
            for condition, texts in (("own_caption", captions), ("shifted_caption", shifted)):
                batch = processor.collate([processor.t2i_example(texts[i], codes[i]) for i in chunk])
                batch = {k: v.to(model.device) for k, v in batch.items()}
                hidden = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_codes=batch["pixel_codes"],
                    semantic_codes=batch["semantic_codes"],
                    image_is_output=batch["image_is_output"],
                    logits_to_keep=-1,
                ).last_hidden_state
                where = model.output_cell_predictors(
                    batch["input_ids"], batch["pixel_codes"], batch["image_is_output"]
                )
                states = hidden[where[:, 0], where[:, 1]]
                variants = {condition: states}
                if condition == "own_caption":
                    order = torch.randperm(states.shape[0], generator=generator).to(states.device)
                    variants["zero_state"] = torch.zeros_like(states)
                    variants["shuffled_state"] = states[order]
                for name, head in heads.items():
                    targets = batch[f"{name}_codes"].reshape(-1, depth).long()
                    for variant, value in variants.items():
                        logits = head(value, targets, tables[name])
                        totals[name][variant] += _per_depth_ce(logits, targets).double().cpu()
            cells += len(chunk) * model.config.num_image_positions
    return {
        name: {condition: (value / cells).tolist() for condition, value in per.items()}
        for name, per in totals.items()
    }


def _entropy(values: torch.Tensor) -> float:
    counts = torch.bincount(values.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _conditional_entropy(values: torch.Tensor, given: torch.Tensor) -> float:
    """Plug-in H(values | given) in nats (biased low when `given` has many rare values)."""
    values, given = values.flatten(), given.flatten()
    order = torch.argsort(given, stable=True)
    values = values[order]
    _, counts = torch.unique_consecutive(given[order], return_counts=True)
    total, start = 0.0, 0
    for count in counts.tolist():
        total += count * _entropy(values[start : start + count])
        start += count
    return total / values.numel()


def code_entropies(
    codes: dict[str, torch.Tensor], cell_classes: torch.Tensor
) -> dict[str, dict[str, list[float]]]:
    """{head: {"marginal" | "given_place" | "given_content" | "given_place_and_content": [nats per depth]}}.

    `codes`: {head: (N, g, g, D) long}; `cell_classes`: (N, g, g) what each cell shows (0 = background)."""
    result = {}
    for name, grid in codes.items():
        if grid.dim() != 4 or grid.shape[:3] != cell_classes.shape:
            raise ValueError(
                f"code_entropies: {name} codes {tuple(grid.shape)} do not match the cell classes "
                f"{tuple(cell_classes.shape)} (expected (N, g, g, D) over (N, g, g))"
            )
        n, g = grid.shape[0], grid.shape[1]
        place = torch.arange(g * g).view(1, g, g).expand(n, g, g)
        content = cell_classes.long()
        joint = content * (g * g) + place
        per: dict[str, list[float]] = {key: [] for key in ("marginal", "given_place", "given_content",
                                                            "given_place_and_content")}  # fmt: skip
        for d in range(grid.shape[-1]):
            values = grid[..., d].long()
            per["marginal"].append(_entropy(values))
            per["given_place"].append(_conditional_entropy(values, place))
            per["given_content"].append(_conditional_entropy(values, content))
            per["given_place_and_content"].append(_conditional_entropy(values, joint))
        result[name] = per
    return result

"""Throughput accounting: the machine's measured matmul peak and the training FLOPs of a DualTokenMLLM batch.

The peak is measured, not looked up: a large `torch.mm` in the training dtype on the training device, timed
best-of-n on every rank at once and summed, so "fraction of peak" compares like with like on any machine.
Training FLOPs follow the usual 6·N·tokens rule (forward 2·N, backward 4·N), applied per part of the model to
the positions that part actually runs on: the LLM blocks on every real token, the lm_head on answer positions
only (the loss never builds full-vocabulary logits elsewhere), the depth-head blocks on each output-image cell
once per residual depth (one classifier per depth), the code MLPs on every image cell. Attention-score FLOPs
are left out (small at these lengths).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from mllm.sequence import IGNORE_INDEX


def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 0, repeats: int = 5
) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) products (size 0: 2048 on CPU, 8192 else)."""
    device = torch.device(device)
    size = size or (2048 if device.type == "cpu" else 8192)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _count(module: nn.Module | None, skip: tuple[nn.Module, ...] = ()) -> int:
    if module is None:
        return 0
    skipped = {id(p) for m in skip for p in m.parameters()}
    # ZeRO-3 partitions parameters; ds_numel is the full size.
    return sum(_numel(p) for p in module.parameters() if id(p) not in skipped)


def _depth_head_params_per_cell(head: nn.Module) -> int:
    """Weights a DepthHead applies to one cell: its blocks at each of the D depth positions, one classifier per
    depth, the hidden-state input once and the code input at the D-1 later positions."""
    depth = head.depth
    blocks = _count(head.blocks) + _count(head.norm)
    classifiers = _numel(head.classifier_weight) + _numel(head.classifier_bias)
    return depth * blocks + classifiers + _count(head.hidden_in) + (depth - 1) * _count(head.code_in)


def _numel(parameter: torch.Tensor) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())


@dataclass(frozen=True)
class FlopModel:
    """Parameter counts of the parts of a DualTokenMLLM that run on different positions."""

    decoder: int  # LLM blocks (embeddings excluded)
    lm_head: int
    depth_head: int  # parameters one head applies per output cell (all depths); both heads run when present
    heads: int  # number of depth heads
    projector: int  # the code MLPs used for one image cell (upper bound: output + understanding)
    cells_per_image: int

    @classmethod
    def of(cls, model: nn.Module) -> FlopModel:
        """Count before DeepSpeed/peft wrap the model (the plain `DualTokenMLLM`)."""
        decoder = model.language_model.get_decoder()
        embeddings = model.get_input_embeddings()
        return cls(
            decoder=_count(decoder, skip=(embeddings,)),
            lm_head=_count(model.get_output_embeddings()),
            depth_head=_depth_head_params_per_cell(model.pixel_head),
            heads=1 + (model.semantic_head is not None),
            projector=_count(model.pixel_projector)
            + _count(model.semantic_projector)
            + _count(model.understanding_projector),
            cells_per_image=model.config.grid_size**2,
        )

    def training_flops(self, batch: dict[str, torch.Tensor]) -> float:
        """6·N·positions summed over the model's parts for one collated batch."""
        tokens = (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )
        answers = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0
        images = int(batch["image_is_output"].numel()) if "image_is_output" in batch else 0
        outputs = int(batch["image_is_output"].sum()) if "image_is_output" in batch else 0
        cells = self.cells_per_image
        forward = (
            self.decoder * tokens
            + self.lm_head * answers
            + self.depth_head * self.heads * outputs * cells
            + self.projector * images * cells
        )
        return 6.0 * forward

"""The cell-lookup calibration task through the tiny preset's Qwen2, with two ways of feeding image cells.

The task (as the shared calibration `cell_lookup.py`): 64 cell tokens (8x8 grid; 1-4 objects on the 3x3 layout,
each object one cell id = 1 + color*5 + shape of 6 colors x 5 shapes, background id 0), a question-kind token, one
or two attribute tokens, then the answer token. Kinds: color of (shape) -> color; shape of (color) -> shape;
count (shape) -> digit; where (shape) -> slot 1..9; exists (color, shape) -> yes/no. Questions name an object by
an attribute, never by its place. Loss on the answer token only; AdamW lr 1e-3 (betas 0.9/0.98, wd 0.01), 200-step
warm-up then cosine, batch 32; accuracy per kind on 1,000 fresh questions every 250 steps.

    --input learned     one learned embedding per cell id (the LLM's own token embedding), as the calibration
    --input projector   the project's cell path: a frozen random code table (1,024 x 32) -> the code MLP
                        (`mllm.cell_embedding.CodeMLP`) -> centred on the image's mean + LayerNorm -> + the learned
                        2-D cell position (`grid_sincos` at init, `--position-rms` its start scale)
    --objects slot      each object is one cell, at its slot's centre cell (the calibration)
    --objects patches   each object covers the cells the shapes world's 64 px render gives it (small or large at
                        random): every 8x8 cell whose centre its bounding box covers, as the project's oracle codes
                        (`data_recipes.cell_truth.cell_class_grid`), 1 to 9 cells depending on slot and size

    .venv/bin/python bench/cell_lookup_paths.py --input projector [--objects patches] [--steps 750] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm.cell_embedding import CodeMLP, grid_sincos  # noqa: E402
from mllm.presets import tiny_text_config  # noqa: E402

COLORS, SHAPES, KINDS = 6, 5, ("color", "shape", "count", "position", "existence")
CELL_IDS = COLORS * SHAPES + 1
KIND0 = CELL_IDS
COLOR0 = KIND0 + len(KINDS)
SHAPE0, DIGIT0 = COLOR0 + COLORS, COLOR0 + COLORS + SHAPES
SLOT0 = DIGIT0 + 5
YES, NO = SLOT0 + 9, SLOT0 + 10
VOCAB = NO + 1
SLOT_CELLS = [(r * 3 + 1) * 8 + (c * 3 + 1) for r in range(3) for c in range(3)]  # slot centres on 8x8


def footprints() -> dict[tuple[int, str], list[int]]:
    """(slot, size) -> the 8x8 cells an object there covers in the shapes world's 64 px render."""
    from data_recipes.cell_truth import cell_class_grid
    from data_recipes.shapes import SIZES, Scene, ShapeObject

    out = {}
    for slot in range(9):
        for size in SIZES:
            obj = ShapeObject(shape="circle", color="red", size=size, row=slot // 3, col=slot % 3)
            grid = cell_class_grid(Scene(objects=[obj])).flatten()
            out[(slot, size)] = torch.nonzero(grid).flatten().tolist()
    return out


FOOTPRINTS = footprints()


def draw(count: int, g: torch.Generator, objects_as: str = "slot") -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (sequence, answer) pairs; `objects_as` 'slot' (one cell per object) or 'patches' (its footprint)."""

    def rand(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    rows, answers = [], []
    for _ in range(count):
        n = 1 + rand(4)
        slots = torch.randperm(9, generator=g)[:n].tolist()
        objects = [(rand(COLORS), rand(SHAPES)) for _ in range(n)]
        cells = [0] * 64
        for (color, shape), slot in zip(objects, slots):
            if objects_as == "slot":
                cells[SLOT_CELLS[slot]] = 1 + color * SHAPES + shape
            else:
                for cell in FOOTPRINTS[(slot, ("small", "large")[rand(2)])]:
                    cells[cell] = 1 + color * SHAPES + shape
        kind, (color, shape) = rand(5), objects[rand(n)]
        first_with_shape = next(k for k in range(n) if objects[k][1] == shape)
        if kind == 0:
            query, answer = [SHAPE0 + shape] * 2, COLOR0 + objects[first_with_shape][0]
        elif kind == 1:
            first_with_color = next(k for k in range(n) if objects[k][0] == color)
            query, answer = [COLOR0 + color] * 2, SHAPE0 + objects[first_with_color][1]
        elif kind == 2:
            query, answer = [SHAPE0 + shape] * 2, DIGIT0 + sum(o[1] == shape for o in objects)
        elif kind == 3:
            query, answer = [SHAPE0 + shape] * 2, SLOT0 + slots[first_with_shape]
        else:
            if rand(2):
                color, shape = rand(COLORS), rand(SHAPES)
            query, answer = [COLOR0 + color, SHAPE0 + shape], YES if (color, shape) in objects else NO
        rows.append(cells + [KIND0 + kind] + query)
        answers.append(answer)
    return torch.tensor(rows), torch.tensor(answers)


class LookupModel(nn.Module):
    def __init__(self, cell_input: str, position_rms: float):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = tiny_text_config(vocab_size=VOCAB)
        config.pop("model_type")
        self.llm = Qwen2ForCausalLM(Qwen2Config(**config))
        self.cell_input = cell_input
        width = config["hidden_size"]
        self.register_buffer("codes", torch.randn(1024, 32, generator=torch.Generator().manual_seed(0)))
        self.projector = CodeMLP(32, width, "gelu")
        self.norm = nn.LayerNorm(width)
        self.position = nn.Parameter(grid_sincos(8, width, rms=position_rms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        if self.cell_input == "learned":
            cells = embed(x[:, :64])
        else:  # depth-0 code = cell id + 1, three more depths at code 0, as the ladder's oracle rung
            cells = self.projector(self.codes[x[:, :64] + 1] + 3 * self.codes[0])
            cells = self.norm(cells - cells.mean(dim=1, keepdim=True)) + self.position
        hidden = torch.cat([cells, embed(x[:, 64:])], dim=1)
        return self.llm(inputs_embeds=hidden).logits[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", choices=("learned", "projector"), default="projector")
    parser.add_argument("--objects", choices=("slot", "patches"), default="slot")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position-rms", type=float, default=0.05)
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LookupModel(args.input, args.position_rms)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1, (t + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
    )
    train_g, eval_g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    eval_x, eval_y = draw(1000, eval_g, args.objects)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = draw(32, train_g, args.objects)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            with torch.no_grad():
                predicted = model(eval_x).argmax(-1)
            kinds = eval_x[:, 64] - KIND0
            per = {
                k: float((predicted[kinds == i] == eval_y[kinds == i]).float().mean())
                for i, k in enumerate(KINDS)
            }
            print(
                f"step {step} loss {loss.item():.3f} "
                + " ".join(f"{k} {100 * v:.0f}" for k, v in per.items())
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

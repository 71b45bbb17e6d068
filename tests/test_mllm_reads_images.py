"""The answer must come from the image: a micro model trained briefly on a two-color world answers a color question
right with its own image and at chance with another image (the shuffled-image control)."""

from __future__ import annotations

import random

import torch
from mllm_testing import build_micro, train_text_tokenizer

COLORS = ("red", "blue")
QUESTION = "what color is the square"


def world(rng: random.Random, grid: int, depth: int) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
    """One object (code 1 = red, 2 = blue at depth 0) in a random cell of a background (code 0) grid."""
    color = rng.randrange(2)
    codes = torch.zeros(grid, grid, depth, dtype=torch.long)
    codes[rng.randrange(grid), rng.randrange(grid), 0] = 1 + color
    return COLORS[color], (codes, codes)


def answer_accuracy(model, processor, scenes, images) -> float:
    """Share of scenes whose answer's first token is the argmax at the position that predicts it."""
    examples = [
        processor.training_example(
            [{"role": "user", "content": "<image>\n" + QUESTION}, {"role": "assistant", "content": color}],
            [image],
        )
        for (color, _), image in zip(scenes, images)
    ]
    batch = processor.collate(examples)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=0)
    hits = []
    for row, labels in enumerate(batch["labels"]):
        first = int((labels != -100).nonzero()[0])
        hits.append(int(out.logits[row, first - 1].argmax()) == int(labels[first]))
    return sum(hits) / len(hits)


def train(model, processor, rng: random.Random, steps: int, batch: int = 16) -> None:
    cfg = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    model.train()
    for _ in range(steps):
        scenes = [world(rng, cfg.grid_size, cfg.rq_depth) for _ in range(batch)]
        examples = [
            processor.training_example(
                [
                    {"role": "user", "content": "<image>\n" + QUESTION},
                    {"role": "assistant", "content": color},
                ],
                [image],
            )
            for color, image in scenes
        ]
        loss = model(**processor.collate(examples)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_a_briefly_trained_micro_model_answers_from_its_image_not_from_the_question(tmp_path):
    tokenizer = train_text_tokenizer(tmp_path / "tok")
    model, processor = build_micro(tokenizer, seed=0, input_cell_norm=True)
    rng = random.Random(0)
    train(model, processor, rng, steps=150)
    cfg = model.config
    scenes = [world(random.Random(1000 + i), cfg.grid_size, cfg.rq_depth) for i in range(64)]
    own = answer_accuracy(model, processor, scenes, [image for _, image in scenes])
    others = [scenes[(i + 1) % len(scenes)][1] for i in range(len(scenes))]
    shuffled = answer_accuracy(model, processor, scenes, others)
    # Chance with the wrong image is ~50% (two colors); reading the image gives nearly all right.
    assert own >= 0.9, (own, shuffled)
    assert own - shuffled >= 0.3, (own, shuffled)

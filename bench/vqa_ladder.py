"""The understanding ladder: where between a clean-token calibration and the demo model does VQA get lost?

Each rung trains the project's own tiny `DualTokenMLLM` (built by `mllm.presets.build`, examples formatted
by its `DualTokenProcessor`, the model's own loss) from scratch on shapes-world VQA and scores it on the same held-out
test questions, per question type, with greedy decoding through `mllm.generation.generate_chat`. Rungs differ
in one thing each:

  oracle       one clean code per 8x8 cell (background, or the object covering it: color x shape x size), random
               frozen code embeddings: what the LLM learns when the image tokens are perfect
               (`--oracle-cells centre`: only the cell under each object's centre holds it, one cell per object as
               in the calibration; the rest is background)
  semantic     the DualToken semantic codes (the paper's understanding tokens)
  sem+pixel    semantic + pixel codes (`understanding_tokens: semantic+pixel`)

Options change the training: `--turns` questions per image in one conversation (1 = the demo's single-question
VQA), `--position` adds the 2-D per-cell position embedding, `--llm` resizes the tiny Qwen2 (`--llm num_hidden_layers=8`),
`--lr`, `--steps`, `--batch`.
It prints one table row per run (and appends it as JSON to `--log`), e.g.

  .venv/bin/python bench/vqa_ladder.py --data runs/demo/data --tokenizer runs/demo/tokenizer --rung oracle
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ladder_training import (  # noqa: E402
    add_training_args,
    check_positive,
    optimizer_and_schedule,
    optimizer_step,
    parse_llm_overrides,
    report_row,
)

from data_recipes.cell_truth import cell_class_grid, centre_cell_grid  # noqa: E402
from data_recipes.shapes import Scene  # noqa: E402
from data_recipes.shapes_text import (  # noqa: E402
    POSITION_PHRASES,
    SHORT_ANSWER_SUFFIX,
    distinct_vqa_items,
    echoed_answer,
    strip_reference,
    vqa_dialogue,
)
from eval.vqa_accuracy import normalize_answer  # noqa: E402
from train.data import llava_messages  # noqa: E402

TYPES = ("color", "shape", "count", "position", "existence")


def read_scenes(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["image_id"]: row for row in rows}


def dense_items(scene: Scene, rng: random.Random, turns: int) -> list[dict]:
    """Up to `turns` distinct VQA items about one scene (drawn from several `vqa_items` rounds)."""
    return distinct_vqa_items(scene, rng, 4 * turns)[:turns]


def conversation(items: list[dict], suffix: str = SHORT_ANSWER_SUFFIX, echo: bool = False) -> list[dict]:
    """The training data's multi-turn VQA conversation of `items`, as processor messages (each question followed
    by `suffix` instead of the training data's short-answer instruction; `echo`: answers written after the
    question's reference words, `shapes_text.echoed_answer`)."""
    if echo:
        items = [{**item, "answer": echoed_answer(item["question"], item["answer"])} for item in items]
    messages = llava_messages({"conversations": vqa_dialogue(items)})
    return [{**m, "content": m["content"].replace(SHORT_ANSWER_SUFFIX, suffix)} for m in messages]


class CodeSource:
    """(pixel, semantic) code grids (h, w, D) per image id: oracle classes, or the DualToken tokenizer's codes."""

    def __init__(
        self, rung: str, data: Path, tokenizer_dir: Path | None, depth: int, oracle_cells: str = "footprint"
    ):
        self.rung, self.data, self.depth, self.oracle_cells = rung, data, depth, oracle_cells
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokenizer = None
        if rung != "oracle":
            from tokenizer.modeling import DualTokenModel

            self.tokenizer = DualTokenModel.from_pretrained(tokenizer_dir).eval()
            self.depth = int(self.tokenizer.config.rq_depth)

    def prefetch(self, split: str, rows: dict[int, dict]) -> None:
        ids = [i for i in rows if (split, i) not in self.cache]
        if self.rung == "oracle":
            for i in ids:
                scene = Scene.from_dict(rows[i]["scene"])
                grid = cell_class_grid(scene) if self.oracle_cells == "footprint" else centre_cell_grid(scene)
                codes = torch.zeros(*grid.shape, self.depth, dtype=torch.long)
                codes[..., 0] = grid
                self.cache[(split, i)] = (codes, codes)
            return
        from data_recipes.image_io import load_image
        from tokenizer.image_processing import preprocess

        size = int(self.tokenizer.config.image_size)
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            images = [load_image(self.data / split / rows[i]["file"]) for i in chunk]
            with torch.no_grad():
                codes = self.tokenizer.encode(preprocess(images, image_size=size))
            for row, i in enumerate(chunk):
                self.cache[(split, i)] = (codes.pixel[row], codes.semantic[row])

    def get(self, split: str, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache[(split, image_id)]


def slot_vectors(grid: int, width: int, args) -> torch.Tensor:
    """(grid*grid, width): one N(0, slot_rms^2) vector per cell of the 3x3 object layout, repeated on every grid cell
    whose centre lies in it (`mllm.cell_embedding.region_vectors`, drawn from the run's own seed)."""
    from mllm.cell_embedding import region_vectors

    g = torch.Generator().manual_seed(args.seed + 7)
    return region_vectors(grid, 3, width, args.slot_rms, generator=g)


def build(args, source: CodeSource, text_tokenizer):
    from mllm.presets import build, tiny_text_config

    # The position embedding's start is this script's choice (--position-start), not the preset's regions.
    overrides = {
        "image_position_embedding": args.position,
        "image_position_regions": 0,
        "input_cell_norm": not args.no_cell_norm,
    }
    if args.llm:
        overrides["text_config"] = tiny_text_config(**parse_llm_overrides(args.llm))
    if args.rung == "sem+pixel":
        overrides["understanding_tokens"] = "semantic+pixel"
    model, processor = build("tiny", text_tokenizer, source.tokenizer, **overrides)
    if args.position_start == "slot":
        with torch.no_grad():
            model.image_cell_position.add_(
                slot_vectors(model.config.grid_size, model.config.hidden_size, args)
            )
    if source.tokenizer is None:
        g = torch.Generator().manual_seed(args.seed)
        shape = model.pixel_code_embedding.shape
        model.set_code_embeddings(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    if args.cell_input == "learned":
        # A trainable embedding per depth-0 code in place of frozen code embeddings + projector (one learned
        # vector per cell class, as the calibration's token embedding).
        table = torch.nn.Embedding(model.config.codebook_size, model.config.hidden_size)
        torch.nn.init.normal_(table.weight, std=0.02)
        model.learned_cell_table = table

        def learned_cells(pixel_codes, semantic_codes):
            return table(semantic_codes[..., 0])

        model.understanding_cell_embedding = learned_cells
    elif args.cell_input == "learned-factored":
        # Oracle rung: a learned vector per color + one per shape + one per size (background: its own vector), so
        # a held-out color-shape pair is made of vectors that trained.
        if args.rung != "oracle":
            raise SystemExit("--cell-input learned-factored needs --rung oracle")
        from data_recipes.cell_truth import NUM_CELL_CLASSES, class_attributes
        from data_recipes.shapes import COLOR_NAMES, SHAPES, SIZES

        parts = torch.zeros(NUM_CELL_CLASSES, 3, dtype=torch.long)  # class 0: index 0 of each table
        for cls in range(1, NUM_CELL_CLASSES):
            color, shape, size = class_attributes(cls)
            parts[cls] = torch.tensor(
                [1 + COLOR_NAMES.index(color), 1 + SHAPES.index(shape), 1 + SIZES.index(size)]
            )
        width = model.config.hidden_size
        tables = torch.nn.ModuleList(
            torch.nn.Embedding(1 + n, width) for n in (len(COLOR_NAMES), len(SHAPES), len(SIZES))
        )
        for table in tables:
            torch.nn.init.normal_(table.weight, std=0.02)
        model.learned_factor_tables = tables

        def learned_cells(pixel_codes, semantic_codes):
            p = parts.to(semantic_codes.device)[semantic_codes[..., 0]]
            return sum(table(p[..., k]) for k, table in enumerate(tables))

        model.understanding_cell_embedding = learned_cells
    elif args.cell_input == "learned-depths":
        # A trainable LLM-width vector per code at every depth, summed over the depths (no code MLP).
        tables = torch.nn.ModuleList(
            torch.nn.Embedding(model.config.codebook_size, model.config.hidden_size)
            for _ in range(model.config.rq_depth)
        )
        for table in tables:
            torch.nn.init.normal_(table.weight, std=0.02)
        model.learned_cell_tables = tables

        def learned_cells(pixel_codes, semantic_codes):
            return sum(table(semantic_codes[..., d]) for d, table in enumerate(tables))

        model.understanding_cell_embedding = learned_cells
    elif args.cell_input == "learned-pixel-depths":
        # The model's own path, plus a trainable LLM-width vector per pixel code at every depth, summed (with
        # patch-local pixel codes a code tuple nearly names what its patch shows, like the oracle's cell class).
        if args.rung != "sem+pixel":
            raise SystemExit("--cell-input learned-pixel-depths needs --rung sem+pixel")
        tables = torch.nn.ModuleList(
            torch.nn.Embedding(model.config.codebook_size, model.config.hidden_size)
            for _ in range(model.config.rq_depth)
        )
        for table in tables:
            torch.nn.init.normal_(table.weight, std=0.02)
        model.learned_pixel_tables = tables
        projected = model.understanding_cell_embedding

        def learned_cells(pixel_codes, semantic_codes):
            learned = sum(table(pixel_codes[..., d]) for d, table in enumerate(tables))
            return projected(pixel_codes, semantic_codes) + learned

        model.understanding_cell_embedding = learned_cells
    elif args.cell_input == "trainable-codes":
        # The model's own path (sum of code embeddings -> code MLP), but the semantic code table trains, starting
        # from the tokenizer's codebook (or the oracle's random table).
        table = torch.nn.Parameter(model.semantic_code_embedding.clone())
        model.register_parameter("trainable_semantic_codes", table)
        projector = model.understanding_projector

        def trainable_cells(pixel_codes, semantic_codes):
            return projector(table[semantic_codes.long()].sum(dim=-2))

        model.understanding_cell_embedding = trainable_cells
    return model, processor


def evaluate(
    model,
    processor,
    source: CodeSource,
    questions: list[dict],
    answers: dict,
    batch: int = 64,
    transcript: list | None = None,
    heldout: set[int] = frozenset(),
    suffix: str = SHORT_ANSWER_SUFFIX,
    echo: bool = False,
) -> dict:
    """Per-type accuracy (color and shape also split by how the object is named: by its place or by an
    attribute; and overall on scenes with and without a held-out color-shape pair, image ids `heldout`);
    `transcript` collects [question, answer, reply] rows when given."""
    from mllm.generation import GenerationSettings, generate_chat

    settings = GenerationSettings.tiny(
        max_new_tokens=10 if echo else 6, temperature=0.0, allow_image_output=False
    )
    correct: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        convs = [[{"role": "user", "content": "<image>\n" + q["question"] + suffix}] for q in chunk]
        images = [[source.get("test", q["image_id"])] for q in chunk]
        replies = generate_chat(model, processor, convs, images, settings)
        for q, reply in zip(chunk, replies):
            truth = answers[q["question_id"]]
            text = strip_reference(q["question"], reply.text) if echo else reply.text
            hit = int(normalize_answer(text) == normalize_answer(truth["multiple_choice_answer"]))
            if transcript is not None:
                transcript.append([q["question"], truth["multiple_choice_answer"], reply.text])
            correct[truth["question_type"]].append(hit)
            correct["held-out scenes" if q["image_id"] in heldout else "seen scenes"].append(hit)
            if truth["question_type"] in ("color", "shape"):
                by_place = any(phrase in q["question"] for phrase in POSITION_PHRASES.values())
                correct[f"{truth['question_type']} by {'place' if by_place else 'attribute'}"].append(hit)
    per = {t: 100.0 * sum(v) / len(v) for t, v in correct.items()}
    main_types = [v for k, v in correct.items() if k in TYPES]
    per["overall"] = 100.0 * sum(sum(v) for v in main_types) / sum(len(v) for v in main_types)
    return per


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "runs/demo/data")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/demo/tokenizer")
    p.add_argument("--text-tokenizer", type=Path, default=ROOT / "runs/demo/text_tokenizer")
    p.add_argument("--rung", choices=("oracle", "semantic", "sem+pixel"), default="oracle")
    p.add_argument("--turns", type=int, default=8, help="questions per image in one conversation")
    p.add_argument("--position", action="store_true", help="2-D per-cell position embedding on input cells")
    p.add_argument(
        "--position-start",
        choices=("sincos", "slot"),
        default="sincos",
        help="start of that embedding: the model's 2-D sine-cosine table, or that plus one random vector per 3x3 "
        "layout slot (rms --slot-rms) shared by the cells whose centre lies in it (the places questions name)",
    )
    p.add_argument("--slot-rms", type=float, default=0.5)
    p.add_argument(
        "--no-cell-norm",
        action="store_true",
        help="feed input cells without centring + LayerNorm (the old model)",
    )
    p.add_argument(
        "--cell-input",
        choices=(
            "projector",
            "learned",
            "learned-factored",
            "learned-depths",
            "learned-pixel-depths",
            "trainable-codes",
        ),
        default="projector",
        help="projector: frozen code embeddings -> code MLP (the model's path); learned: a trainable vector per "
        "depth-0 code; learned-factored (oracle): one per color + shape + size, summed; learned-depths: one per code at every depth, summed; learned-pixel-depths: the projector path "
        "plus one learned vector per pixel code at every depth, summed (sem+pixel rung); trainable-codes: the projector path over a trainable copy of the semantic code table",
    )
    p.add_argument(
        "--oracle-cells",
        choices=("footprint", "centre"),
        default="footprint",
        help="oracle rung: an object on every cell it covers, or on the one cell under its centre",
    )
    p.add_argument(
        "--no-suffix",
        action="store_true",
        help="questions without the short-answer instruction after them (train and test)",
    )
    p.add_argument(
        "--echo",
        action="store_true",
        help="answers written after the question's reference words ('cross red'; scored on the part after them)",
    )
    p.add_argument("--eval-questions", type=int, default=600)
    p.add_argument(
        "--eval-seed",
        type=int,
        default=0,
        help="seed of the test-question sample (fixed, so runs with different --seed are scored on the same questions)",
    )
    p.add_argument(
        "--llm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="tiny Qwen2 config overrides, e.g. num_hidden_layers=8 or hidden_size=384 num_attention_heads=6",
    )
    add_training_args(p, steps=600, batch=16, warmup=100)
    args = p.parse_args(argv)
    check_positive(p, args, ("turns", "eval_questions"))
    if args.position_start == "slot" and not args.position:
        p.error("--position-start slot needs --position (it starts that embedding)")
    if not args.slot_rms > 0:
        p.error(f"--slot-rms must be > 0, got {args.slot_rms}")
    for name in ("data", "text_tokenizer") + (("tokenizer",) if args.rung != "oracle" else ()):
        if not getattr(args, name).exists():
            p.error(
                f"--{name.replace('_', '-')} {getattr(args, name)} does not exist (run `make demo` first)"
            )
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    text_tokenizer = AutoTokenizer.from_pretrained(args.text_tokenizer)
    train_rows = read_scenes(args.data / "train" / "scenes.jsonl")
    test_rows = read_scenes(args.data / "test" / "scenes.jsonl")
    questions = json.loads((args.data / "test" / "vqa_questions.json").read_text())["questions"]
    answers = {
        a["question_id"]: a
        for a in json.loads((args.data / "test" / "vqa_annotations.json").read_text())["annotations"]
    }
    pick = random.Random(args.eval_seed).sample(
        range(len(questions)), min(args.eval_questions, len(questions))
    )
    questions = [questions[i] for i in sorted(pick)]
    heldout = {i for i, row in test_rows.items() if row.get("heldout")}
    suffix = "" if args.no_suffix else SHORT_ANSWER_SUFFIX
    source = CodeSource(args.rung, args.data, args.tokenizer, depth=4, oracle_cells=args.oracle_cells)
    t0 = time.perf_counter()
    source.prefetch("train", train_rows)
    source.prefetch("test", {q["image_id"]: test_rows[q["image_id"]] for q in questions})
    encode_s = time.perf_counter() - t0
    model, processor = build(args, source, text_tokenizer)
    model.train()
    opt, sched = optimizer_and_schedule(model, args)
    rng = random.Random(args.seed + 1)
    ids = sorted(train_rows)
    t0 = time.perf_counter()
    curve = []
    for step in range(1, args.steps + 1):
        examples = []
        for _ in range(args.batch):
            image_id = rng.choice(ids)
            items = dense_items(Scene.from_dict(train_rows[image_id]["scene"]), rng, args.turns)
            examples.append(
                processor.training_example(
                    conversation(items, suffix, args.echo), [source.get("train", image_id)]
                )
            )
        batch = processor.collate(examples)
        loss = model(**batch).loss
        optimizer_step(model, opt, sched, loss)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            model.eval()
            curve.append(
                {
                    "step": step,
                    **evaluate(
                        model,
                        processor,
                        source,
                        questions,
                        answers,
                        heldout=heldout,
                        suffix=suffix,
                        echo=args.echo,
                    ),
                }
            )
            model.train()
            print(json.dumps(curve[-1]), flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    transcript: list = []
    result = evaluate(
        model,
        processor,
        source,
        questions,
        answers,
        transcript=transcript,
        heldout=heldout,
        suffix=suffix,
        echo=args.echo,
    )
    row = {
        "rung": args.rung, "turns": args.turns, "position": args.position, "position_start": args.position_start, "slot_rms": args.slot_rms, "cell_norm": not args.no_cell_norm, "cell_input": args.cell_input, "oracle_cells": args.oracle_cells, "suffix": bool(suffix), "echo": args.echo, "steps": args.steps, "batch": args.batch,
        "lr": args.lr, "llm": args.llm, "train_s": round(train_s, 1), "encode_s": round(encode_s, 1),
        **{k: round(v, 1) for k, v in result.items()}, "curve": curve, "replies": transcript,
    }  # fmt: skip
    labels = [
        args.rung,
        "-" if args.no_cell_norm else "yes",
        str(args.turns),
        "2-D" if args.position else "-",
    ]
    return report_row(args, row, labels, row, ("overall", *TYPES))


if __name__ == "__main__":
    main()

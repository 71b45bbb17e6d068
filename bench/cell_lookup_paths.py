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

The bisection toward the project's own VQA (learned cell tokens, one per cell class of color x shape x size):

    --questions project   fresh `sample_scene` scenes and the project's questions (`distinct_vqa_items`: objects
                          named by place or attribute, answers as words), tokenized by the project's text
                          tokenizer; loss on the answer tokens (and the turn end); a question is right when every
                          answer token is the argmax (teacher forcing, which is what greedy decoding emits)
    --template bare       cells, then the question, then the answer: no chat template
    --template chat       the processor's chat template (`<|im_start|>user ... <boi> cells <eoi> question`)
    --filler N            (calibration questions) N fixed tokens after the question, so that the answer is read
                          off a token that is not the query itself, as after a chat template's assistant header
    --question-first      (calibration questions) the question before the cells instead of after them
    --echo                (calibration questions) the answer turn first repeats the query's two tokens, with
                          loss on them too, then answers: the copy is supervised on its own, and the answer is
                          read right after the query as without a filler (scored greedily, echo included)
    --template bare-question-first  the question, then the cells, then `<eoi>`, then the answer
    --question-loss       (bare template) next-token loss on the question's tokens too, not only the answer's
    --template chat-suffix  the same plus LLaVA's short-answer instruction after the question (the training data)
    --llm KEY=VALUE ...   tiny Qwen2 config overrides (layers, width, heads) for either task
    --text-warmup N       first N steps on the same questions over scenes written as text (a caption naming every
                          object and its place, where the cells go; its own warm-up + cosine schedule), then
                          --steps on cells: does a question-answering circuit learned on text carry to cells?

    .venv/bin/python bench/cell_lookup_paths.py --input projector [--objects patches] [--steps 750] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ladder_training import optimizer_and_schedule, optimizer_step, parse_llm_overrides, reinit  # noqa: E402

from mllm.cell_embedding import CodeMLP, grid_sincos  # noqa: E402
from mllm.presets import tiny_text_config  # noqa: E402

COLORS, SHAPES, KINDS = 6, 5, ("color", "shape", "count", "position", "existence")
CELL_IDS = COLORS * SHAPES + 1
KIND0 = CELL_IDS
COLOR0 = KIND0 + len(KINDS)
SHAPE0, DIGIT0 = COLOR0 + COLORS, COLOR0 + COLORS + SHAPES
SLOT0 = DIGIT0 + 5
YES, NO = SLOT0 + 9, SLOT0 + 10
FILLER = (
    NO + 1
)  # a fixed token after the question (--filler): the answer is then read off a token that is not the query
VOCAB = FILLER + 1
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


def draw(
    count: int, g: torch.Generator, objects_as: str = "slot", filler: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (sequence, answer) pairs; `objects_as` 'slot' (one cell per object) or 'patches' (its footprint);
    `filler` fixed tokens after each question."""

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
        rows.append(cells + [KIND0 + kind] + query + [FILLER] * filler)
        answers.append(answer)
    return torch.tensor(rows), torch.tensor(answers)


class LookupModel(nn.Module):
    def __init__(
        self, cell_input: str, position_rms: float, question_first: bool = False, llm: dict | None = None
    ):
        super().__init__()
        self.question_first = question_first
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = tiny_text_config(vocab_size=VOCAB, **(llm or {}))
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
        if self.question_first:  # kind + 2 query tokens, then the cells, then any filler
            hidden = torch.cat([embed(x[:, 64:67]), cells, embed(x[:, 67:])], dim=1)
        else:
            hidden = torch.cat([cells, embed(x[:, 64:])], dim=1)
        return self.llm(inputs_embeds=hidden).logits[:, -3:]


class ProjectText:
    """The project's questions about fresh scenes, tokenized by the demo's text tokenizer, one template."""

    def __init__(self, text_tokenizer: Path, template: str, objects_as: str, echo: bool = False):
        from transformers import AutoTokenizer

        from mllm.presets import build

        self.tok = AutoTokenizer.from_pretrained(text_tokenizer)
        self.template, self.objects_as, self.echo = template, objects_as, echo
        _, self.processor = build("tiny", self.tok, None)
        self.img = self.processor.ids["img_token_id"]
        self.vocab = len(self.tok)

    def cells(self, scene) -> list[int]:
        from data_recipes.cell_truth import cell_class_grid, centre_cell_grid

        grid = cell_class_grid(scene) if self.objects_as == "patches" else centre_cell_grid(scene)
        return grid.flatten().tolist()

    def example(
        self, scene, item: dict, question_loss: bool, as_text: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """(ids with the image's cells as `img` ids, labels (-100 = no loss), the 64 cell classes). `as_text`:
        the scene is written as its caption (`shapes_text.captions`, objects and places) where the cells go."""
        from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX, captions, echoed_answer

        cells = self.cells(scene)
        caption = captions(scene)[0] if as_text else ""
        scene_ids = self.tok.encode(caption, add_special_tokens=False) if as_text else [self.img] * 64
        if self.echo:
            item = {**item, "answer": echoed_answer(item["question"], item["answer"])}
        if self.template.startswith("bare"):
            question = self.tok.encode(item["question"], add_special_tokens=False)
            answer = self.tok.encode(" " + item["answer"], add_special_tokens=False) + [self.tok.eos_token_id]
            if self.template == "bare-question-first":
                ids = question + scene_ids + [self.processor.ids["eoi_token_id"]] + answer
                return ids, [-100] * (len(ids) - len(answer)) + answer, cells
            ids = scene_ids + question + answer
            asked = question if question_loss else [-100] * len(question)
            return ids, [-100] * len(scene_ids) + asked + answer, cells
        suffix = SHORT_ANSWER_SUFFIX if self.template == "chat-suffix" else ""
        messages = [
            {
                "role": "user",
                "content": (caption if as_text else "<image>") + "\n" + item["question"] + suffix,
            },
            {"role": "assistant", "content": item["answer"]},
        ]
        codes = torch.zeros(8, 8, 4, dtype=torch.long)
        ex = self.processor.training_example(messages, [] if as_text else [(codes, codes)])
        return ex.input_ids, ex.labels, cells

    def draw(
        self, count: int, rng, question_loss: bool = False, as_text: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        from data_recipes.shapes import sample_scene
        from data_recipes.shapes_text import distinct_vqa_items

        rows = []
        for _ in range(count):
            scene = sample_scene(rng)
            item = distinct_vqa_items(scene, rng, 4)[0]
            rows.append((*self.example(scene, item, question_loss, as_text), item["question_type"]))
        from mllm.sequence import pad_sequences

        ids, mask = pad_sequences([r[0] for r in rows], int(self.tok.pad_token_id or 0), side="right")
        labels, _ = pad_sequences([r[1] for r in rows], -100, side="right")
        cells = torch.tensor([r[2] for r in rows])
        return ids, labels, mask, cells, [r[3] for r in rows]


class ProjectTextModel(nn.Module):
    """The tiny Qwen2 over the project's text; image cells are learned vectors per cell class."""

    def __init__(self, vocab: int, img: int, llm: dict | None = None):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from data_recipes.cell_truth import NUM_CELL_CLASSES

        config = tiny_text_config(vocab_size=vocab, **(llm or {}))
        config.pop("model_type")
        self.llm = Qwen2ForCausalLM(Qwen2Config(**config))
        self.cells = nn.Embedding(NUM_CELL_CLASSES, config["hidden_size"])
        nn.init.normal_(self.cells.weight, std=0.02)
        self.img = img

    def forward(self, ids, mask, cells) -> torch.Tensor:
        hidden = self.llm.get_input_embeddings()(ids).clone()
        if (ids == self.img).any():  # scenes written as text have no cells
            hidden[ids == self.img] = self.cells(cells).flatten(0, 1).to(hidden.dtype)
        return self.llm(inputs_embeds=hidden, attention_mask=mask).logits


def run_project(args) -> None:
    import random

    if args.question_loss and args.template != "bare":
        raise SystemExit("--question-loss runs with --template bare")
    text = ProjectText(args.text_tokenizer, args.template, args.objects, args.echo)
    model = ProjectTextModel(text.vocab, text.img, parse_llm_overrides(args.llm))
    reinit(model.llm, args.init, own_std="initializer_range" in parse_llm_overrides(args.llm))
    train_rng, eval_rng = random.Random(1), random.Random(2)
    held = text.draw(1000, eval_rng)  # scored on the answer tokens only
    start = time.perf_counter()

    def score(batch, label: str, step: int, loss: torch.Tensor) -> None:
        ids, labels, mask, cells, kinds = batch
        with torch.no_grad():
            predicted = model(ids, mask, cells)[:, :-1].argmax(-1)
        target = labels[:, 1:]
        right = ((predicted == target) | (target == -100)).all(dim=1).tolist()
        per = {
            k: 100 * sum(r for r, q in zip(right, kinds) if q == k) / max(1, kinds.count(k)) for k in KINDS
        }
        print(
            f"{label}step {step} loss {loss.item():.3f} "
            + " ".join(f"{k} {v:.0f}" for k, v in per.items())
            + f" overall {100 * sum(right) / len(right):.1f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    def phase(steps: int, as_text: bool, eval_batch, label: str) -> None:
        opt, sched = optimizer_and_schedule(model, argparse.Namespace(**{**vars(args), "steps": steps}))
        for step in range(1, steps + 1):
            ids, labels, mask, cells, _ = text.draw(32, train_rng, args.question_loss, as_text)
            logits = model(ids, mask, cells)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            optimizer_step(model, opt, sched, loss)
            if step % 250 == 0 or step == steps:
                score(eval_batch, label, step, loss)

    if args.text_warmup:  # the LLM first learns the questions over scenes written as text, then over cells
        phase(args.text_warmup, True, text.draw(1000, random.Random(3), as_text=True), "text scenes: ")
    phase(args.steps, False, held, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", choices=("learned", "projector"), default="projector")
    parser.add_argument("--objects", choices=("slot", "patches"), default="slot")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--position-rms", type=float, default=0.05)
    parser.add_argument(
        "--filler",
        type=int,
        default=0,
        help="calibration questions: fixed tokens between question and answer",
    )
    parser.add_argument(
        "--question-first", action="store_true", help="calibration questions: the question before the cells"
    )
    parser.add_argument(
        "--echo",
        action="store_true",
        help="the answer turn repeats the query first (project questions: "
        "`shapes_text.echoed_answer`, 'cross red'; scored on every answer token, echo included)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--warmup", type=int, default=200, help="linear warm-up steps before the cosine decay"
    )
    parser.add_argument("--questions", choices=("calibration", "project"), default="calibration")
    parser.add_argument(
        "--template", choices=("bare", "bare-question-first", "chat", "chat-suffix"), default="chat-suffix"
    )
    parser.add_argument(
        "--question-loss",
        action="store_true",
        help="project questions, bare template: loss on the question too",
    )
    parser.add_argument(
        "--text-warmup",
        type=int,
        default=0,
        help="project questions: first train N steps on scenes written as captions, then --steps on cells",
    )
    parser.add_argument(
        "--llm",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="tiny Qwen2 config overrides, e.g. num_hidden_layers=8 hidden_size=128",
    )
    parser.add_argument(
        "--init",
        nargs="*",
        default=[],
        metavar="NAMES=STD",
        help="redraw the LLM's weight matrices whose names hold NAMES (comma-separated) from N(0, STD), "
        "e.g. q_proj,k_proj=0.1",
    )
    parser.add_argument("--text-tokenizer", type=Path, default=Path("runs/demo/text_tokenizer"))
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1 or args.warmup < 1:
        parser.error("--steps, --threads and --warmup must be >= 1")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.questions == "project":
        if args.input != "learned":
            parser.error("--questions project runs with --input learned")
        if not args.text_tokenizer.exists():
            parser.error(f"--text-tokenizer {args.text_tokenizer} does not exist (run `make demo` first)")
        run_project(args)
        return
    model = LookupModel(args.input, args.position_rms, args.question_first, parse_llm_overrides(args.llm))
    reinit(model.llm, args.init, own_std="initializer_range" in parse_llm_overrides(args.llm))
    opt, sched = optimizer_and_schedule(model, args)
    train_g, eval_g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    eval_x, eval_y = draw(1000, eval_g, args.objects, args.filler)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = draw(32, train_g, args.objects, args.filler)
        if args.echo:  # the answer turn starts by repeating the query (2 tokens), then gives the answer
            query = x[:, 65:67]
            logits = model(torch.cat([x, query], dim=1))
            loss = F.cross_entropy(logits.flatten(0, 1), torch.cat([query, y[:, None]], dim=1).flatten())
        else:
            loss = F.cross_entropy(model(x)[:, -1], y)
        optimizer_step(model, opt, sched, loss)
        if step % 250 == 0 or step == args.steps:
            with torch.no_grad():
                if args.echo:  # greedy: the model writes the echo itself, then the answer
                    x = eval_x
                    for _ in range(2):
                        x = torch.cat([x, model(x)[:, -1:].argmax(-1)], dim=1)
                    predicted = model(x)[:, -1].argmax(-1)
                else:
                    predicted = model(eval_x)[:, -1].argmax(-1)
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

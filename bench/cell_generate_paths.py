"""The cell-generation calibration task through the project's parts, one part swapped in at a time.

The task (as the shared calibration `cell_generate.py`): a caption of 1-3 objects, three tokens each (color of 6,
shape of 5, slot of the 3x3 layout), left-padded to 9 tokens with `<boi>`, then `<boi>`, then the 64 cells of the
8x8 grid (background, or color x shape at the slot's centre cell), predicted left to right. Loss on the 64 cells;
AdamW lr 1e-3 (betas 0.9/0.98, wd 0.01), 200-step warm-up then cosine, clipping 1.0, batch 32. Every
`--eval-every` steps, 200 fresh captions are decoded greedily: grids exactly right and objects drawn right.

    --llm gpt         the calibration's pre-norm GPT (learned absolute positions, LayerNorm, GELU MLP)
    --llm qwen2       the tiny preset's Qwen2ForCausalLM body (RoPE, RMSNorm, SwiGLU, grouped KV heads)
    --cells learned   one learned embedding per cell id (the calibration)
    --cells projector the project's output-cell path: the cell id as the depth-0 code of a frozen random code
                      table (1,024 x 32, depths 1-3 at code 0), summed, through the code MLP to half the width,
                      the other half zeros (the pixel-head-only model, `DualTokenMLLM.output_cell_embedding`)
    --head softmax    one linear classifier over the cell ids (the calibration)
    --head depth      the project's `DepthHead` (3 layers, 128 wide, 4 residual depths, the cell id at depth 0)
    --init project    the head's and code MLP's Linear layers normal(0, 0.02), as `DualTokenMLLM` initialises them
    --code-prior      the depth head's classifiers start at the code frequencies (`DepthHead.set_code_prior`)
    --cell-position   a learned per-cell embedding (2-D sine-cosine at init) added to every cell's input, so the
                      state that predicts cell i+1 knows it sits at cell i without counting from `<boi>`
    --objects patches each object is drawn large on every cell it covers in the shapes world's 64 px render (4-9
                      cells by slot, `data_recipes.cell_truth.cell_class_grid`) instead of one cell at its slot's
                      centre; an object counts as drawn right when all its cells are

    .venv/bin/python bench/cell_generate_paths.py --llm qwen2 --cells projector --head depth [--steps 750]
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

from ladder_training import reinit  # noqa: E402

from mllm.cell_embedding import CodeMLP, grid_sincos  # noqa: E402
from mllm.depth_head import DepthHead  # noqa: E402
from mllm.presets import tiny_text_config  # noqa: E402

COLORS, SHAPES = 6, 5
CELL_IDS = COLORS * SHAPES + 1  # 0 = background
COLOR0, SHAPE0 = CELL_IDS, CELL_IDS + COLORS
SLOT0 = SHAPE0 + SHAPES
BOI = SLOT0 + 9
VOCAB = BOI + 1
CAPTION = 10  # 9 caption tokens (left-padded) + <boi>
SLOT_CELLS = [(r * 3 + 1) * 8 + (c * 3 + 1) for r in range(3) for c in range(3)]
CODE_DIM = 32


def large_footprints() -> list[list[int]]:
    """Per slot, the 8x8 cells a large object there covers in the shapes world's 64 px render."""
    from data_recipes.cell_truth import cell_class_grid
    from data_recipes.shapes import Scene, ShapeObject

    out = []
    for slot in range(9):
        obj = ShapeObject(shape="circle", color="red", size="large", row=slot // 3, col=slot % 3)
        out.append(torch.nonzero(cell_class_grid(Scene(objects=[obj])).flatten()).flatten().tolist())
    return out


OBJECT_CELLS = {"slot": [[cell] for cell in SLOT_CELLS], "patches": large_footprints()}


def draw(count: int, g: torch.Generator, objects_as: str = "slot") -> tuple[torch.Tensor, torch.Tensor, list]:
    """`count` (caption (count, 10), grid (count, 64), objects) triples; `objects_as` 'slot' puts an object on
    its slot's centre cell, 'patches' on every cell a large object there covers."""
    captions, grids, objects = [], [], []
    for _ in range(count):
        n = int(torch.randint(1, 4, (1,), generator=g))
        slots = torch.randperm(9, generator=g)[:n].tolist()
        objs = [
            (int(torch.randint(COLORS, (1,), generator=g)), int(torch.randint(SHAPES, (1,), generator=g)), s)
            for s in slots
        ]
        caption = [t for color, shape, slot in objs for t in (COLOR0 + color, SHAPE0 + shape, SLOT0 + slot)]
        grid = [0] * 64
        for color, shape, slot in objs:
            for cell in OBJECT_CELLS[objects_as][slot]:
                grid[cell] = 1 + color * SHAPES + shape
        captions.append([BOI] * (9 - len(caption)) + caption + [BOI])
        grids.append(grid)
        objects.append(objs)
    return torch.tensor(captions), torch.tensor(grids), objects


class GPTBody(nn.Module):
    """The calibration's pre-norm GPT body: (B, L, d) embeddings -> (B, L, d) final-normed states."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4, length: int = CAPTION + 64):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "out": nn.Linear(width, width),
                    "ln2": nn.LayerNorm(width),
                    "mlp": nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        x = x + self.position[:length]
        for block in self.blocks:
            q, k, v = (
                block["qkv"](block["ln1"](x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            )
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["out"](attended.transpose(1, 2).reshape(batch, length, width))
            x = x + block["mlp"](block["ln2"](x))
        return self.norm(x)


class QwenBody(nn.Module):
    """The tiny preset's Qwen2 body (its final RMSNorm included)."""

    def __init__(self, init_std: float | None = None, reinit_pairs: list[str] | None = None):
        super().__init__()
        from transformers import Qwen2Config, Qwen2Model

        # --llm-init: the body's initializer_range instead of the preset's
        config = tiny_text_config(VOCAB, **({} if init_std is None else {"initializer_range": init_std}))
        config.pop("model_type")
        self.model = Qwen2Model(Qwen2Config(**config))
        reinit(self.model, reinit_pairs or [], "--llm-reinit", own_std=init_std is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x).last_hidden_state


class Generator(nn.Module):
    def __init__(
        self,
        llm: str,
        cells: str,
        head: str,
        cell_position: bool,
        depth: int,
        codebook: int,
        head_layers: int,
        init: str = "default",
        code_prior: bool = False,
        objects_as: str = "slot",
        llm_init: float | None = None,
        llm_reinit: list[str] | None = None,
    ):
        super().__init__()
        self.depth, self.codebook = depth, codebook
        width = 256
        self.body = GPTBody(width) if llm == "gpt" else QwenBody(llm_init, llm_reinit)
        self.embed = nn.Embedding(VOCAB, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.cells, self.head_kind = cells, head
        codes = torch.randn(codebook, CODE_DIM, generator=torch.Generator().manual_seed(0))
        self.register_buffer("codes", codes)
        self.projector = CodeMLP(CODE_DIM, width // 2, "gelu") if cells == "projector" else None
        self.cell_position = nn.Parameter(grid_sincos(8, width)) if cell_position else None
        if head == "depth":
            self.head = DepthHead(width, CODE_DIM, codebook, depth, width=128, layers=head_layers, heads=4)
        else:
            self.head = nn.Linear(width, CELL_IDS)
        if init == "project":  # DualTokenMLLM._init_weights: every Linear normal(0, 0.02), biases 0
            for module in (self.head, self.projector):
                for layer in module.modules() if module is not None else ():
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=0.02)
                        nn.init.zeros_(layer.bias)
        if code_prior and head == "depth":  # the code frequencies of 2,000 drawn grids
            grids = draw(2000, torch.Generator().manual_seed(3), objects_as)[1].flatten()
            counts = torch.zeros(depth, codebook, dtype=torch.long)
            counts[0] = torch.bincount(grids, minlength=codebook)
            counts[1:, 0] = grids.numel()  # depths 1.. always hold code 0
            self.head.set_code_prior(counts)

    def cell_inputs(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, n) cell ids of cells 0..n-1 -> (B, n, width)."""
        if self.projector is None:
            x = self.embed(grid)
        else:
            x = self.projector(self.codes[grid] + (self.depth - 1) * self.codes[0])
            x = torch.cat([x, torch.zeros_like(x)], dim=-1)
        if self.cell_position is not None:
            x = x + self.cell_position[: grid.shape[1]]
        return x

    def states(self, caption: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """States that predict cells 0..n (the caption's last token and every fed cell), (B, n+1, width)."""
        x = torch.cat([self.embed(caption), self.cell_inputs(grid)], dim=1)
        return self.body(x)[:, CAPTION - 1 :]

    def loss(self, states: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, cross-entropy of the cell ids alone: the depth-0 part of a depth head's loss)."""
        if self.head_kind == "softmax":
            loss = F.cross_entropy(self.head(states).reshape(-1, CELL_IDS), grid.reshape(-1))
            return loss, loss
        codes = torch.zeros(*grid.shape, self.depth, dtype=torch.long)
        codes[..., 0] = grid
        logits = self.head(states.reshape(-1, states.shape[-1]), codes.reshape(-1, self.depth), self.codes)
        first = F.cross_entropy(logits[:, 0], codes.reshape(-1, self.depth)[:, 0])
        return F.cross_entropy(logits.reshape(-1, self.codebook), codes.reshape(-1)), first

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        """Greedy cell id from states (B, width)."""
        if self.head_kind == "softmax":
            return self.head(states).argmax(-1)
        zeros = torch.zeros(states.shape[0], self.depth, dtype=torch.long)
        logits = self.head(states, zeros, self.codes)[:, 0, :CELL_IDS]  # depth 0 sees only the state
        return logits.argmax(-1)


@torch.no_grad()
def evaluate(
    model: Generator, captions: torch.Tensor, grids: torch.Tensor, objects: list, objects_as: str = "slot"
) -> tuple[float, float]:
    drawn = torch.zeros(len(captions), 0, dtype=torch.long)
    for _ in range(64):
        nxt = model.predict(model.states(captions, drawn)[:, -1])
        drawn = torch.cat([drawn, nxt[:, None]], dim=1)
    exact = float((drawn == grids).all(1).float().mean())
    hits = [
        all(int(drawn[i, cell]) == 1 + c * SHAPES + sh for cell in OBJECT_CELLS[objects_as][s])
        for i, objs in enumerate(objects)
        for c, sh, s in objs
    ]
    return exact, sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", choices=("gpt", "qwen2"), default="qwen2")
    parser.add_argument("--cells", choices=("learned", "projector"), default="learned")
    parser.add_argument("--head", choices=("softmax", "depth"), default="softmax")
    parser.add_argument("--cell-position", action="store_true")
    parser.add_argument("--rq-depth", type=int, default=4, help="residual depths of the depth head's codes")
    parser.add_argument("--codebook", type=int, default=1024, help="codes per depth (>= 31 cell ids)")
    parser.add_argument(
        "--init",
        choices=("default", "project"),
        default="default",
        help="project: the head's and code MLP's Linear layers normal(0, 0.02) as DualTokenMLLM initialises them",
    )
    parser.add_argument(
        "--head-layers", type=int, default=3, help="depth-transformer blocks of the depth head"
    )
    parser.add_argument(
        "--code-prior",
        action="store_true",
        help="the depth head starts at the code frequencies (DepthHead.set_code_prior, as training does)",
    )
    parser.add_argument("--objects", choices=("slot", "patches"), default="slot")
    parser.add_argument(
        "--llm-init",
        type=float,
        default=None,
        help="the Qwen2 body's initializer_range for every matrix (default: the tiny preset's start, 0.1; "
        "the README's ladder rows used 0.02)",
    )
    parser.add_argument(
        "--llm-reinit",
        nargs="*",
        default=[],
        metavar="NAMES=STD",
        help="then redraw the body's matrices whose names hold NAMES from N(0, STD), e.g. q_proj,k_proj=0.1",
    )
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if min(args.steps, args.eval_every, args.threads, args.rq_depth) < 1 or not args.lr > 0:
        parser.error("--steps, --eval-every, --threads and --rq-depth must be >= 1 and --lr > 0")
    if args.codebook < CELL_IDS or args.head_layers < 0:
        parser.error(f"--codebook must be >= {CELL_IDS} and --head-layers >= 0")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = Generator(
        args.llm,
        args.cells,
        args.head,
        args.cell_position,
        args.rq_depth,
        args.codebook,
        args.head_layers,
        args.init,
        args.code_prior,
        args.objects,
        args.llm_init,
        args.llm_reinit,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1, (t + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
    )
    train_g = torch.Generator().manual_seed(1)
    eval_set = draw(200, torch.Generator().manual_seed(2), args.objects)
    start = time.perf_counter()
    print(" ".join(f"{k} {v}" for k, v in vars(args).items()), flush=True)
    for step in range(1, args.steps + 1):
        captions, grids, _ = draw(32, train_g, args.objects)
        loss, cell_loss = model.loss(model.states(captions, grids[:, :-1]), grids)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} cell loss {cell_loss.item():.4f}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            exact, objects = evaluate(model, *eval_set, args.objects)
            model.train()
            print(
                f"step {step} loss {loss.item():.4f} grids exact {exact:.3f} objects drawn right {objects:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The generation ladder: where between clean cell tokens and the demo model does text-to-image lose the caption?

Each rung trains the project's own tiny `DualTokenMLLM` (built by `mllm.presets.build`, examples formatted by its
`DualTokenProcessor.t2i_example`, images drawn by `mllm.generation.generate_images` with the demo's CFG sampling)
from scratch on the shapes world's text-to-image prompts only, and scores the drawn images of the same held-out
test prompts with the T2I scene-parser check, per category. Rungs differ in the image codes:

  oracle       one clean code per 8x8 cell at depth 0 (`data_recipes.cell_truth`: background, or the covering
               object's color x shape x size; depths 1.. are 0), random frozen code embeddings, pixel head only;
               drawn grids are read back into scenes and rendered, so the parser sees perfect pictures
  pixel        the DualToken pixel codes, pixel head only (images from the pixel decoder)
  sem+pixel    pixel + semantic codes and both heads (the demo model's generator)

Options: `--output-position` (a 2-D position embedding on output cells), `--depth-weights` (loss weight per
residual depth, e.g. 1,0.3,0.1,0.1), `--semantic-weight` (the semantic head's loss weight), `--steps`, `--batch`, `--lr`, `--caption-dropout` (the unconditional share for
CFG), `--cfg`. Besides the T2I scores, every row reports the per-depth
image losses of `eval.t2i_diagnostics` on the test prompts' own images (own vs shifted caption, zeroed LLM state).

  .venv/bin/python bench/t2i_ladder.py --rung oracle --steps 1000 --batch 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ladder_training import (  # noqa: E402
    add_training_args,
    check_positive,
    optimizer_and_schedule,
    optimizer_step,
    report_row,
)

from data_recipes.cell_truth import cell_class_grid, scene_from_cell_classes  # noqa: E402
from data_recipes.code_shards import CodeStore, image_key  # noqa: E402
from data_recipes.shapes import Scene, render  # noqa: E402
from eval.t2i_scoring import T2I_TAGS, load_prompt_specs, score_t2i  # noqa: E402
from mllm.presets import tiny_fields  # noqa: E402


def read_scenes(path: Path) -> dict[int, Scene]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["image_id"]: Scene.from_dict(row["scene"]) for row in rows}


class Codes:
    """(pixel, semantic) code grids (g, g, D) of a prompt's image: oracle classes or DualToken codes."""

    def __init__(self, rung: str, data: Path, tokenizer_dir: Path, codes_dir: Path, depth: int = 4):
        self.rung, self.data, self.depth = rung, data, depth
        self.tokenizer, self.store = None, None
        self.scenes = {split: read_scenes(data / split / "scenes.jsonl") for split in ("train", "test")}
        self.test_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if rung != "oracle":
            from tokenizer.modeling import DualTokenModel

            self.tokenizer = DualTokenModel.from_pretrained(tokenizer_dir).eval()
            self.depth = int(self.tokenizer.config.rq_depth)
            self.store = CodeStore(codes_dir)

    def _oracle(self, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.zeros(8, 8, self.depth, dtype=torch.long)
        codes[..., 0] = cell_class_grid(scene)
        return codes, codes

    def train(self, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rung == "oracle":
            return self._oracle(self.scenes["train"][spec["image_id"]])
        pixel, semantic = self.store.get(image_key(spec["file"]))
        return pixel.long(), semantic.long()

    def code_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel, semantic) (D, K) code counts over the train split (`DualTokenMLLM.set_code_priors`)."""
        if self.rung != "oracle":
            return self.store.code_counts()
        grids = torch.stack([self._oracle(scene)[0] for scene in self.scenes["train"].values()])
        flat = grids.reshape(-1, self.depth)
        counts = torch.stack(
            [torch.bincount(flat[:, d], minlength=tiny_fields()["codebook_size"]) for d in range(self.depth)]
        )
        return counts, counts

    def test(self, specs: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.rung == "oracle":
            return [self._oracle(self.scenes["test"][s["image_id"]]) for s in specs]
        from data_recipes.image_io import load_image
        from tokenizer.image_processing import preprocess

        todo = [s for s in specs if s["image_id"] not in self.test_cache]
        if todo:
            images = [load_image(self.data / "test" / s["file"]) for s in todo]
            with torch.no_grad():
                codes = self.tokenizer.encode(
                    preprocess(images, image_size=int(self.tokenizer.config.image_size))
                )
            for row, s in enumerate(todo):
                self.test_cache[s["image_id"]] = (codes.pixel[row], codes.semantic[row])
        return [self.test_cache[s["image_id"]] for s in specs]


def build(args, codes: Codes, text_tokenizer):
    from mllm.presets import build

    model, processor = build(
        "tiny",
        text_tokenizer,
        codes.tokenizer,
        use_semantic_head=args.rung == "sem+pixel",
        output_position_embedding=args.output_position,
        semantic_loss_weight=args.semantic_weight,
        output_semantic_dropout=args.semantic_dropout,
    )
    if codes.tokenizer is None:
        g = torch.Generator().manual_seed(args.seed)
        shape = model.pixel_code_embedding.shape
        model.set_code_embeddings(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    if args.code_prior:
        model.set_code_priors(*codes.code_counts())
    return model, processor


def weighted_image_loss(
    out, batch, weights: torch.Tensor, depth: int, semantic_weight: float = 1.0
) -> torch.Tensor:
    """Sum over heads of the per-depth cross-entropies weighted by `weights` (normalised to sum 1), the semantic
    head's times `semantic_weight` (the model's `semantic_loss_weight`)."""
    total = 0.0
    for name, head_weight in (("pixel", 1.0), ("semantic", semantic_weight)):
        logits = getattr(out, f"{name}_logits", None)
        if logits is None:
            continue
        targets = batch[f"{name}_codes"][batch["image_is_output"]].reshape(-1, depth).long()
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        total = total + head_weight * (ce.view(targets.shape).mean(dim=0) * weights).sum()
    return total


def draw_grids(model, processor, captions: list[str], args) -> torch.Tensor:
    """(P, h, w, D) pixel code grids, one per caption, drawn with the demo's sampling (`args.cfg`,
    `args.temperature`) in batches of 32; row r samples from stream `args.seed + r` whatever the batching."""
    from mllm.generation import GenerationSettings, generate_images

    settings = GenerationSettings.tiny(cfg_scale=args.cfg, image_temperature=args.temperature)
    grids = []
    for start in range(0, len(captions), 32):
        chunk = captions[start : start + 32]
        result = generate_images(
            model, processor, chunk, settings.with_overrides(seed=args.seed + start), decode=False
        )
        grids.append(result.pixel_codes[:, 0])
    return torch.cat(grids)


def draw_and_score(model, processor, codes: Codes, specs: list[dict], args) -> dict:
    """Per-category T2I scores (%) of one picture per spec: the oracle rung's class grids read back into scenes
    and rendered, the other rungs' pixel codes through the pixel decoder."""
    from mllm.generation import decode_codes

    grids = draw_grids(model, processor, [s["prompt"] for s in specs], args)
    if codes.rung == "oracle":
        images = [render(scene_from_cell_classes(grid[..., 0])) for grid in grids]
    else:
        images = decode_codes(processor, grids)
    scored = score_t2i(specs, images, show_progress=False)["all"]
    return {"overall": 100 * scored["overall"], **{t: 100 * v for t, v in scored["per_tag"].items()}}


def compact_caption(scene: Scene) -> str:
    return "; ".join(f"{o.size} {o.color} {o.shape} {o.position}" for o in scene.objects)


def exact_scenes(model, processor, codes: Codes, specs: list[dict], captions: list[str], args) -> float:
    """% of the specs' test scenes drawn exactly (every object, attribute and place) from `captions` (oracle
    rung: the drawn class grid read back into a scene; other rungs: the decoded image parsed)."""
    from data_recipes.scene_parser import parse_scene
    from mllm.generation import decode_codes

    grids = draw_grids(model, processor, captions, args)
    if codes.rung == "oracle":
        drawn = [scene_from_cell_classes(grid[..., 0]) for grid in grids]
    else:
        drawn = [parse_scene(image) for image in decode_codes(processor, grids)]
    truth = [codes.scenes["test"][s["image_id"]] for s in specs]
    return 100.0 * sum(a == b for a, b in zip(drawn, truth)) / len(truth)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "runs/demo/data")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/demo/tokenizer")
    p.add_argument("--codes", type=Path, default=ROOT / "runs/demo/codes/train")
    p.add_argument("--text-tokenizer", type=Path, default=ROOT / "runs/demo/text_tokenizer")
    p.add_argument("--rung", choices=("oracle", "pixel", "sem+pixel"), default="oracle")
    p.add_argument("--depth-weights", default="1,1,1,1", help="loss weight per residual depth (normalised)")
    p.add_argument(
        "--semantic-weight",
        type=float,
        default=1.0,
        help="weight of the semantic head's loss against the pixel head's (sem+pixel rung; the model's "
        "semantic_loss_weight)",
    )
    p.add_argument(
        "--semantic-dropout",
        type=float,
        default=0.0,
        help="zero the semantic half of an output image's cell inputs with this probability in training (1: "
        "always, in drawing too; the model's output_semantic_dropout)",
    )
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--caption-share",
        type=float,
        default=0.0,
        help="share of training examples that draw a train image from its dense captions (captions.json: every "
        "object with its place) instead of a GenEval-style prompt",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="the --caption-share examples get a compact caption naming every object's size, color, shape and "
        "place ('small red circle top left; large blue square center'), the calibration's captions",
    )
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="image sampling temperature (the demo's: 1)"
    )
    p.add_argument(
        "--code-prior",
        action="store_true",
        help="start the depth heads at the train split's code frequencies (what `dualtoken train mllm` does)",
    )
    p.add_argument(
        "--output-position",
        action="store_true",
        help="add a learned 2-D position embedding to output-image cells (`output_position_embedding`)",
    )
    p.add_argument("--save", type=Path, default=None, help="save the trained model here (save_pretrained)")
    p.add_argument("--eval-prompts", type=int, default=120)
    add_training_args(p, steps=1000, batch=32, warmup=200)
    args = p.parse_args(argv)
    check_positive(p, args, ("eval_prompts",))
    if not args.semantic_weight >= 0:
        p.error(f"--semantic-weight must be >= 0, got {args.semantic_weight}")
    for name in ("caption_share", "caption_dropout", "semantic_dropout"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    needed = ("data", "text_tokenizer") + (("tokenizer", "codes") if args.rung != "oracle" else ())
    for name in needed:
        if not getattr(args, name).exists():
            p.error(
                f"--{name.replace('_', '-')} {getattr(args, name)} does not exist (run `make demo` first)"
            )
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from eval.t2i_diagnostics import image_loss_diagnostics

    codes = Codes(args.rung, args.data, args.tokenizer, args.codes)
    try:
        weights = torch.tensor([float(w) for w in args.depth_weights.split(",")])
    except ValueError:
        weights = torch.tensor([])
    if weights.numel() != codes.depth or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        p.error(
            f"--depth-weights needs {codes.depth} non-negative weights with a positive sum, got {args.depth_weights}"
        )
    weights = weights / weights.sum()
    text_tokenizer = AutoTokenizer.from_pretrained(args.text_tokenizer)
    train_specs = load_prompt_specs(args.data / "train" / "prompts.jsonl")
    test_specs = load_prompt_specs(args.data / "test" / "prompts.jsonl")
    eval_specs = sorted(random.Random(args.seed).sample(test_specs, min(args.eval_prompts, len(test_specs))),
                        key=lambda s: s["prompt_id"])  # fmt: skip
    diag_specs = eval_specs[:64]
    diag_codes = codes.test(diag_specs)
    # The same images with their first dense caption (every object and its place).
    test_captions = {}
    for row in json.loads((args.data / "test" / "captions.json").read_text())["annotations"]:
        test_captions.setdefault(row["image_id"], row["caption"])
    dense = [test_captions[s["image_id"]] for s in diag_specs]
    if args.compact:
        dense = [compact_caption(codes.scenes["test"][s["image_id"]]) for s in diag_specs]
    model, processor = build(args, codes, text_tokenizer)
    model.train()
    opt, sched = optimizer_and_schedule(model, args)
    train_captions = json.loads((args.data / "train" / "captions.json").read_text())
    captions = train_captions["annotations"]
    files = {row["id"]: row["file_name"] for row in train_captions["images"]}
    rng = random.Random(args.seed + 1)
    curve, t0 = [], time.perf_counter()

    def evaluate(step: int) -> dict:
        model.eval()
        row = {
            "step": step,
            **draw_and_score(model, processor, codes, eval_specs, args),
        }
        diag = image_loss_diagnostics(model, processor, [s["prompt"] for s in diag_specs], diag_codes)
        row["losses"] = diag
        row["losses_dense_captions"] = image_loss_diagnostics(model, processor, dense, diag_codes)
        if args.caption_share > 0:
            row["exact_scenes"] = exact_scenes(model, processor, codes, diag_specs, dense, args)
        model.train()
        print(
            json.dumps(
                {
                    k: (round(v, 1) if isinstance(v, float) else v)
                    for k, v in row.items()
                    if not k.startswith("losses")
                }
            )
        )
        for name in ("losses", "losses_dense_captions"):
            for head, per in row[name].items():
                print("  ", name, head, {c: [round(x, 3) for x in v] for c, v in per.items()}, flush=True)
        return row

    for step in range(1, args.steps + 1):
        examples = []
        for _ in range(args.batch):
            spec = rng.choice(train_specs)
            if rng.random() < args.caption_share:
                caption = rng.choice(captions)
                if args.compact:
                    caption = {
                        **caption,
                        "caption": compact_caption(codes.scenes["train"][caption["image_id"]]),
                    }
                spec = {
                    "prompt": caption["caption"],
                    "image_id": caption["image_id"],
                    "file": files[caption["image_id"]],
                }
            examples.append(
                processor.t2i_example(
                    spec["prompt"], codes.train(spec), drop_caption=rng.random() < args.caption_dropout
                )
            )
        batch = processor.collate(examples)
        out = model(**batch)
        loss = out.loss_text + weighted_image_loss(out, batch, weights, codes.depth, args.semantic_weight)
        optimizer_step(model, opt, sched, loss)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            curve.append(evaluate(step))
    train_s = time.perf_counter() - t0
    final = evaluate(args.steps)
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
    row = {"rung": args.rung, "output_position": args.output_position, "depth_weights": args.depth_weights, "semantic_weight": args.semantic_weight, "semantic_dropout": args.semantic_dropout, "caption_share": args.caption_share, "compact": args.compact, "steps": args.steps, "batch": args.batch,
           "lr": args.lr, "cfg": args.cfg, "temperature": args.temperature, "caption_dropout": args.caption_dropout, "train_s": round(train_s, 1),
           **final, "curve": curve}  # fmt: skip
    return report_row(args, row, [args.rung, args.depth_weights], final, ("overall", *T2I_TAGS))


if __name__ == "__main__":
    main()

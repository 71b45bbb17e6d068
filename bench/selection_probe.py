"""Where does the answer look? Attention from the answer onto the image, for shapes-world color questions.

A model that answers "What color is the star?" by reading the star has to put its attention on the star's cells.
For each color question of a split, this probe runs the trained model on the question as `dualtoken eval vqa`
asks it, takes the attention of the position that predicts the answer's first token (eager attention, averaged
over heads) and reports per layer, averaged over questions in scenes of two or more objects:

  on cells      the share of that position's attention that lands on image cells at all
  on target     of the attention on object cells, the share on the cells of the object(s) with the true color
  target area   the target's share of all object cells: what attention spread evenly over the objects gives
  on background the share of the attention on cells that lands on background cells
  background    the background's share of the 64 cells: what attention spread evenly over the cells gives

Selection shows as `on target` well above `target area`; a model that pools the image evenly sits at it. Only
the direct attention of that one position is measured: a selection made earlier, at the question's words, and
read from there would not show here. Cells
belong to an object when its bounding box covers the cell centre (`data_recipes.cell_truth.cell_class_grid`).
Rows are split by whether the greedy first answer token is the true answer's first token.

    .venv/bin/python bench/selection_probe.py --model runs/long_init01/mllm --data runs/long_init01/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.cell_truth import cell_class_grid, class_attributes  # noqa: E402
from data_recipes.image_io import load_image  # noqa: E402
from data_recipes.shapes import Scene  # noqa: E402
from data_recipes.shapes_text import question_form  # noqa: E402
from eval.tasks import scene_objects, vqa_conversation  # noqa: E402
from eval.vqa_accuracy import _load_json, _records  # noqa: E402
from mllm.checkpoint import load_checkpoint  # noqa: E402


def color_questions(split: Path, limit: int) -> list[dict]:
    """Color questions on scenes of two or more objects, with the scene and the true answer."""
    questions = json.loads((split / "vqa_questions.json").read_text())["questions"]
    annotations, name = _load_json(split / "vqa_annotations.json", "annotations")
    truth = {
        a["question_id"]: a["multiple_choice_answer"] for a in _records(annotations, "annotations", name)
    }
    scenes = {i: Scene.from_dict({"objects": o}) for i, o in scene_objects(split / "scenes.jsonl").items()}
    picked = []
    for q in questions:
        form = question_form(q["question"])
        scene = scenes[q["image_id"]]
        if form and form.startswith("color") and len(scene.objects) >= 2:
            picked.append({**q, "form": form, "answer": truth[q["question_id"]], "scene": scene})
    return picked[:limit]


@torch.no_grad()
def probe(model, processor, split: Path, item: dict) -> dict:
    image = load_image(split / "images" / f"{item['image_id']:07d}.png")
    batch = processor.collate([processor.inference_prompt(vqa_conversation(item["question"]), [image])])
    ids = batch["input_ids"]
    embeds = model.embed_inputs(
        ids, batch.get("pixel_codes"), batch.get("semantic_codes"), batch.get("image_is_output")
    )
    out = model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True
    )
    said = int(out.logits[0, -1].argmax())
    first_true = processor.tokenizer(item["answer"], add_special_tokens=False)["input_ids"][0]
    cells = (ids[0] == model.config.img_token_id).nonzero().flatten()
    classes = cell_class_grid(item["scene"]).flatten()
    is_object = classes > 0
    is_target = torch.tensor(
        [bool(c) and class_attributes(int(c))[0] == item["answer"] for c in classes.tolist()]
    )
    layers = []
    for attention in out.attentions:
        row = attention[0, :, -1].mean(dim=0)  # heads averaged, the answer-predicting position
        on_cells = row[cells]
        on_objects = on_cells[is_object].sum()
        layers.append(
            {
                "on cells": float(on_cells.sum()),
                "on target": float(on_cells[is_target].sum() / on_objects.clamp_min(1e-12)),
                "target area": float(is_target.sum() / is_object.sum()),
                "on background": float(on_cells[~is_object].sum() / on_cells.sum().clamp_min(1e-12)),
                "background": float((~is_object).float().mean()),
            }
        )
    return {"right": said == first_true, "layers": layers}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved DualTokenMLLM directory")
    parser.add_argument("--data", required=True, help="shapes-world dataset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="color questions at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", help="append the result as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_checkpoint(args.model, device="cpu")
    model.language_model.set_attn_implementation("eager")
    split = Path(args.data) / args.split
    items = color_questions(split, args.limit)
    if not items:
        raise SystemExit(f"selection_probe: no color question on a scene of two or more objects in {split}")
    results = [probe(model, processor, split, item) for item in items]
    summary = {"model": args.model, "split": args.split, "questions": len(results), "by_answer": {}}
    print(f"{len(results)} color questions on scenes of 2+ objects, {args.model}")
    print("| answer | questions | layer | on cells | on target | target area | on background | background |")
    print("|---|---|---|---|---|---|---|---|")
    for name, keep in (("right", True), ("wrong", False), ("all", None)):
        part = [r for r in results if keep is None or r["right"] == keep]
        if not part:
            continue
        rows = []
        for layer in range(len(part[0]["layers"])):
            mean = {k: sum(r["layers"][layer][k] for r in part) / len(part) for k in part[0]["layers"][0]}
            rows.append(mean)
            print(
                f"| {name} | {len(part)} | {layer} | {mean['on cells']:.3f} | {mean['on target']:.3f} | "
                f"{mean['target area']:.3f} | {mean['on background']:.3f} | {mean['background']:.3f} |"
            )
        summary["by_answer"][name] = {"questions": len(part), "layers": rows}
    if args.log:
        with open(args.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

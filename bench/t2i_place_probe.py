"""Does the generator put an object where the caption says? Draws one object per caption at each of the nine layout
places, in the dataset's own caption form ("A large red circle in the top left corner."), and reads the images back
with the scene parser: per asked place, the share of images with an object there, with exactly one object, and with
the asked object (color and shape) at the asked place; and the place confusion (where the objects were drawn).

A generator that ignores the place words but draws k objects scattered at random puts one at the asked place about
k/9 of the time; the printed "chance" line is that rate computed from the images' own object counts.

  .venv/bin/python bench/t2i_place_probe.py --model runs/long/mllm_t2i [--per-place 8] [--out runs/place_probe]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_recipes.atomic_io import atomic_save_png, atomic_write_json  # noqa: E402
from data_recipes.scene_parser import parse_scene  # noqa: E402
from data_recipes.shapes import COLOR_NAMES, GRID, SHAPES, SIZES, Scene, ShapeObject  # noqa: E402
from data_recipes.shapes_text import captions  # noqa: E402


def probe_objects(per_place: int, seed: int) -> list[ShapeObject]:
    """`per_place` objects (seeded color, shape and size) at each of the GRID x GRID places, place-major."""
    rng = random.Random(seed)
    return [
        ShapeObject(rng.choice(SHAPES), rng.choice(COLOR_NAMES), rng.choice(SIZES), row, col)
        for row in range(GRID)
        for col in range(GRID)
        for _ in range(per_place)
    ]


def score(asked: list[ShapeObject], parsed: list[Scene]) -> dict:
    """Per asked place and overall: object at the place, exactly one object, the asked object at the place."""
    rows, confusion, counts = [], Counter(), Counter()
    for obj, scene in zip(asked, parsed):
        there = [o for o in scene.objects if (o.row, o.col) == (obj.row, obj.col)]
        counts[len(scene.objects)] += 1
        for o in scene.objects:
            confusion[(obj.row, obj.col, o.row, o.col)] += 1
        rows.append(
            {
                "place": (obj.row, obj.col),
                "object_there": bool(there),
                "one_object": len(scene.objects) == 1,
                "asked_there": any(o.shape == obj.shape and o.color == obj.color for o in there),
                "objects": len(scene.objects),
            }
        )

    def mean(key, subset):
        return 100 * sum(r[key] for r in subset) / max(1, len(subset))

    places = sorted({r["place"] for r in rows})
    return {
        "overall": {key: mean(key, rows) for key in ("object_there", "one_object", "asked_there")},
        "chance_object_there": 100
        * sum(min(r["objects"], GRID * GRID) / (GRID * GRID) for r in rows)
        / len(rows),
        "per_place": {
            f"{row},{col}": {
                key: mean(key, [r for r in rows if r["place"] == (row, col)])
                for key in ("object_there", "one_object", "asked_there")
            }
            for row, col in places
        },
        "objects_per_image": dict(sorted(counts.items())),
        "drawn_at_per_asked_place": {
            f"{row},{col}": {
                f"{r2},{c2}": confusion[(row, col, r2, c2)]
                for r2 in range(GRID)
                for c2 in range(GRID)
                if confusion[(row, col, r2, c2)]
            }
            for row, col in places
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="runs/demo/mllm",
        help="a saved DualTokenMLLM directory (default: the demo's final model)",
    )
    parser.add_argument("--per-place", type=int, default=8, help="captions per layout place")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="folder for the images and probe.json (default: none kept)")
    args = parser.parse_args(argv)
    if args.per_place < 1 or args.batch_size < 1:
        parser.error(f"--per-place and --batch-size must be >= 1, got {args.per_place} and {args.batch_size}")
    if not (Path(args.model) / "config.json").exists():
        parser.error(f"--model {args.model}: no saved model there (run `make demo` first, or name one)")

    import torch

    from mllm.checkpoint import load_checkpoint
    from mllm.generation import GenerationSettings, generate_images

    torch.set_num_threads(args.threads)
    model, processor = load_checkpoint(args.model)
    asked = probe_objects(args.per_place, args.seed)
    texts = [captions(Scene((obj,)))[0] for obj in asked]
    settings = GenerationSettings.for_codebook(model.config.codebook_size)
    images = []
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        result = generate_images(model, processor, batch, settings.with_overrides(seed=args.seed + start))
        images += [drawn[0] for drawn in result.images]
        print(f"drawn {len(images)}/{len(texts)}", file=sys.stderr, flush=True)
    result = score(asked, [parse_scene(image) for image in images])
    result["model"], result["captions"] = str(args.model), len(texts)
    if args.out:
        out = Path(args.out)
        (out / "images").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            atomic_save_png(image, out / "images" / f"{i:03d}.png")
        atomic_write_json(out / "captions.json", texts)
        atomic_write_json(out / "probe.json", result)
    overall = result["overall"]
    print(f"{args.model}: {len(texts)} captions, one object each")
    print(
        f"  object at the asked place {overall['object_there']:.1f}% (chance from the drawn counts "
        f"{result['chance_object_there']:.1f}%), the asked object there {overall['asked_there']:.1f}%, "
        f"exactly one object {overall['one_object']:.1f}%"
    )
    print(f"  objects per image: {result['objects_per_image']}")
    print("  object at the asked place, per place (rows top to bottom):")
    for row in range(GRID):
        cells = [result["per_place"][f"{row},{col}"]["object_there"] for col in range(GRID)]
        print("   " + " ".join(f"{v:5.1f}" for v in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

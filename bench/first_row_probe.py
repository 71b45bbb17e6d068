"""Do an image's first cells, all background, already tell what the rest of the scene holds?

A generator that draws cells in raster order and is fed its own codes back (teacher-forced in training) can copy
the scene from codes that carry it instead of reading the caption. This probe takes the train images whose top
row of 8 cells is plain background (`data_recipes.cell_truth.cell_class_grid`), and trains a linear classifier
from the one-hot codes of those 8 cells (one depth at a time) to the colors present in the scene (8 labels), on
80% of them; it prints the per-color accuracy on the other 20% next to always answering each color's majority.
Pixel codes are patch-local and should tell nothing; the semantic codes come from a deep layer that attends over
the whole image.

    .venv/bin/python bench/first_row_probe.py [--run runs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_recipes.cell_truth import cell_class_grid  # noqa: E402
from data_recipes.code_shards import CodeStore, image_key  # noqa: E402
from data_recipes.shapes import Scene  # noqa: E402


def probe(x: torch.Tensor, y: torch.Tensor, split: int, steps: int = 300) -> float:
    """Per-label test accuracy of a multi-label linear probe (Adam, L2 1e-4) trained on the first `split` rows."""
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(x[:split] @ w + b, y[:split]) + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[split:] @ w + b > 0) == (y[split:] > 0.5)).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run (data + codes)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    scenes_file, codes_dir = args.run / "data/train/scenes.jsonl", args.run / "codes/train"
    for path in (scenes_file, codes_dir):
        if not path.exists():
            p.error(f"{path} does not exist (run `make demo` first)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in scenes_file.read_text().splitlines() if line.strip()]
    scenes = {image_key(row["file"]): Scene.from_dict(row["scene"]) for row in rows}
    colors = sorted({obj.color for scene in scenes.values() for obj in scene.objects})
    store = CodeStore(codes_dir)
    keys = [
        key for key in sorted(scenes) if key in store and bool((cell_class_grid(scenes[key])[0] == 0).all())
    ]
    labels = torch.tensor(
        [[float(any(o.color == c for o in scenes[k].objects)) for c in colors] for k in keys]
    )
    grids = [store.get(key) for key in keys]
    split = int(0.8 * len(keys))
    majority = ((labels[:split].mean(0) > 0.5) == (labels[split:] > 0.5)).float().mean().item()
    print(f"{len(keys)} of {len(store)} train images have a background top row; colors {colors}")
    print(f"always the majority per color: {majority:.3f}")
    for branch, index in (("pixel", 0), ("semantic", 1)):
        codes = torch.stack([grid[index] for grid in grids]).long()  # (n, h, w, D)
        for depth in range(codes.shape[-1]):
            top_row = codes[:, 0, :, depth]
            x = F.one_hot(top_row, int(top_row.max()) + 1).float().flatten(1)
            accuracy = probe(x, labels, split)
            print(f"{branch} depth {depth}: per-color accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()

"""`dualtoken tokenizer probe`: what a DualToken tokenizer's code grids tell about each part of a shapes-world image.

Per branch (pixel, semantic) the quantized latent of every grid token (the sum of its D code vectors) is probed with
a small MLP trained on 80% of the images and scored on the other 20%:

- **per scene cell** (the 3x3 placement grid of the shapes world): the latents of the grid tokens whose centres
  fall in the cell, concatenated, predict the color and the shape of the object there (scored on cells holding an
  object) and whether the cell is empty;
- **per token**: a token's latent alone predicts its own row in the grid (chance 1/g), i.e. how much absolute
  position the codes carry for an LLM that only sees them in raster order.

What an MLLM can read from its visual input is bounded by these numbers, so they separate "the codes lack it"
from "the LLM did not learn it" when an understanding score is low.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_recipes.shapes import COLOR_NAMES, GRID, SHAPES, Scene

BRANCHES = ("pixel", "semantic")


def cell_tokens(grid: int, cells: int = GRID) -> list[list[tuple[int, int]]]:
    """For each scene cell (row-major over cells x cells), the grid tokens whose centres fall inside it."""
    owner = [min(int((i + 0.5) / grid * cells), cells - 1) for i in range(grid)]
    return [
        [(r, c) for r in range(grid) for c in range(grid) if owner[r] == row and owner[c] == col]
        for row in range(cells)
        for col in range(cells)
    ]


def cell_features(latents: torch.Tensor, cells: int = GRID) -> torch.Tensor:
    """(N, g, g, C) token latents -> (N, cells*cells, T*C): each cell's token latents concatenated, zero padded to
    the largest cell's T tokens."""
    groups = cell_tokens(latents.shape[1], cells)
    width = max(len(group) for group in groups)
    out = latents.new_zeros(latents.shape[0], len(groups), width, latents.shape[-1])
    for index, group in enumerate(groups):
        rows, cols = zip(*group)
        out[:, index, : len(group)] = latents[:, list(rows), list(cols)]
    return out.flatten(2)


def cell_labels(scenes: list[Scene], cells: int = GRID) -> dict[str, torch.Tensor]:
    """(N, cells*cells) class indices: "color" and "shape" of each cell's object, -1 where the cell is empty."""
    color = torch.full((len(scenes), cells * cells), -1, dtype=torch.long)
    shape = torch.full_like(color, -1)
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            color[n, obj.row * cells + obj.col] = COLOR_NAMES.index(obj.color)
            shape[n, obj.row * cells + obj.col] = SHAPES.index(obj.shape)
    return {"color": color, "shape": shape}


def probe_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    train: torch.Tensor,
    classes: int,
    steps: int = 1500,
    seed: int = 0,
) -> float:
    """Train a 1-hidden-layer MLP on the rows where `train` is set (standardised inputs, Adam, batches of 512) and
    return its accuracy on the other rows."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    probe = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    x_train, y_train = x[train], labels[train]
    for _ in range(steps):
        batch = torch.randint(0, x_train.shape[0], (min(512, x_train.shape[0]),), generator=generator)
        loss = nn.functional.cross_entropy(probe(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(x[~train]).argmax(-1) == labels[~train]).float().mean().item()


def probe_latents(
    latents: dict[str, torch.Tensor], scenes: list[Scene], steps: int = 1500, seed: int = 0
) -> dict[str, Any]:
    """Probe accuracies per branch for (N, g, g, C) latents of the images whose scenes are given."""
    n = len(scenes)
    if n < 10:
        raise ValueError(f"probe: {n} images; need at least 10 (80% train, 20% test)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_images = torch.zeros(n, dtype=torch.bool)
    train_images[order[: int(0.8 * n)]] = True
    labels = cell_labels(scenes)
    occupied = labels["color"] >= 0
    results: dict[str, Any] = {"images": n, "test_images": int((~train_images).sum())}
    for branch, latent in latents.items():
        if latent.shape[0] != n:
            raise ValueError(f"probe: {latent.shape[0]} {branch} latents for {n} scenes")
        grid = latent.shape[1]
        cells = cell_features(latent.float())
        cell_train = train_images[:, None].expand_as(occupied)
        row: dict[str, float] = {}
        for name, classes in (("color", len(COLOR_NAMES)), ("shape", len(SHAPES))):
            row[f"cell_{name}"] = probe_accuracy(
                cells[occupied], labels[name][occupied], cell_train[occupied], classes, steps, seed
            )
        row["cell_empty"] = probe_accuracy(
            cells.flatten(0, 1), occupied.flatten().long(), cell_train.flatten(), 2, steps, seed
        )
        tokens = latent.float().flatten(0, 2)
        token_rows = torch.arange(grid).repeat_interleave(grid).repeat(n)
        token_train = train_images.repeat_interleave(grid * grid)
        row["token_row"] = probe_accuracy(tokens, token_rows, token_train, grid, steps, seed)
        row["token_row_chance"] = 1.0 / grid
        results[branch] = row
    return results


def probe_tokenizer(
    tokenizer_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "train",
    limit: int | None = 4000,
    steps: int = 1500,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode up to `limit` images of a shapes-world split with the tokenizer and probe their latents."""
    from tokenizer.encode import (
        dataset_images,
        default_device,
        is_shapes_dataset,
        load_pixels,
        load_tokenizer,
        shapes_split_dir,
    )

    data_dir = Path(data_dir)
    if not is_shapes_dataset(data_dir):
        raise ValueError(
            f"probe: {data_dir} is not a shapes-world dataset (no manifest.json); the labels come from its scenes"
        )
    images = dataset_images(data_dir, split)[:limit]
    scene_file = shapes_split_dir(data_dir, split) / "scenes.jsonl"
    by_file = {}
    for line in scene_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_file[record["file"]] = Scene.from_dict(
                record["scene"], where=f"{scene_file}: {record['file']}"
            )
    scenes = [by_file[image.ref] for image in images]
    device = default_device()
    model = load_tokenizer(tokenizer_dir, device)
    latents: dict[str, list[torch.Tensor]] = {branch: [] for branch in BRANCHES}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = load_pixels(images[start : start + batch_size], model.config.image_size).to(device)
            codes = model.encode(pixels)
            for branch in BRANCHES:
                latents[branch].append(model.embed_codes(getattr(codes, branch), branch).cpu())
    result = probe_latents({k: torch.cat(v) for k, v in latents.items()}, scenes, steps, seed)
    return {"tokenizer": str(tokenizer_dir), "data": str(data_dir), "split": split, "steps": steps, **result}


def format_probe(result: dict[str, Any]) -> str:
    lines = [
        f"probe on {result['test_images']} held-back images of {result.get('split', '?')} "
        f"(trained on {result['images'] - result['test_images']})",
        f"{'branch':<10}{'cell color':>12}{'cell shape':>12}{'cell empty':>12}{'token row':>11}{'chance':>8}",
    ]
    for branch in BRANCHES:
        if branch in result:
            r = result[branch]
            lines.append(
                f"{branch:<10}{r['cell_color']:>12.1%}{r['cell_shape']:>12.1%}{r['cell_empty']:>12.1%}"
                f"{r['token_row']:>11.1%}{r['token_row_chance']:>8.1%}"
            )
    return "\n".join(lines)


def _probe(args) -> int:
    torch.set_num_threads(args.threads)
    try:
        result = probe_tokenizer(args.model, args.data, args.split, args.limit, args.steps, seed=args.seed)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"dualtoken tokenizer probe: error: {error}", file=sys.stderr)
        return 2
    if args.out:
        from data_recipes.atomic_io import atomic_write_json

        atomic_write_json(args.out, result)
    print(format_probe(result))
    return 0


def register(tok_sub) -> None:
    """Add `dualtoken tokenizer probe`."""
    parser = tok_sub.add_parser(
        "probe",
        help="MLP probes: what the pixel and semantic codes tell about each scene cell and token position",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "--model", "--tokenizer", dest="model", required=True, type=Path, help="tokenizer directory"
    )
    parser.add_argument("--data", required=True, type=Path, help="shapes-world dataset directory")
    parser.add_argument("--split", default="train", help="split to encode (default train)")
    parser.add_argument("--limit", type=int, default=4000, help="images to encode (default 4000)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the accuracies as JSON here")
    parser.set_defaults(func=_probe)

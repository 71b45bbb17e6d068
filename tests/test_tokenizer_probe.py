"""`tokenizer.probe`: the scene-cell token groups, and probes that find exactly the information planted in
synthetic latents (and no more)."""

from __future__ import annotations

import random

import torch

from data_recipes.shapes import COLOR_NAMES, sample_scene
from mllm.console import main
from tokenizer.probe import cell_labels, cell_tokens, probe_latents


def test_cell_tokens_partition_the_grid_by_token_centres():
    groups = cell_tokens(8)
    # Token centres at (i + 0.5) * 8 px against cell borders at 21.3 and 42.7 px: rows 0-2 | 3-4 | 5-7.
    assert [len(g) for g in groups] == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    flat = [token for group in groups for token in group]
    assert sorted(flat) == [(r, c) for r in range(8) for c in range(8)]
    assert groups[0] == [(r, c) for r in range(3) for c in range(3)] and (7, 7) in groups[8]
    assert groups[4] == [(3, 3), (3, 4), (4, 3), (4, 4)]
    assert [len(g) for g in cell_tokens(3)] == [1] * 9


def _planted_latents(scenes, grid=8):
    """pixel: each token holds a one-hot of its cell's color (or 'empty') and nothing else; semantic: a one-hot
    of the token's row plus noise, and nothing about the scene."""
    colors = cell_labels(scenes)["color"]
    groups = cell_tokens(grid)
    generator = torch.Generator().manual_seed(0)
    pixel = 0.1 * torch.randn(len(scenes), grid, grid, len(COLOR_NAMES) + 1, generator=generator)
    for n in range(len(scenes)):
        for cell, group in enumerate(groups):
            for r, c in group:
                pixel[n, r, c, int(colors[n, cell])] += 1.0  # index -1 (empty) is the last slot
    semantic = 0.1 * torch.randn(len(scenes), grid, grid, grid, generator=generator)
    semantic += torch.eye(grid)[:, None, :].expand(grid, grid, grid)
    return {"pixel": pixel, "semantic": semantic}


def test_probes_recover_what_the_latents_carry_and_nothing_else():
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(300)]
    result = probe_latents(_planted_latents(scenes), scenes, steps=300, seed=0)
    pixel, semantic = result["pixel"], result["semantic"]
    assert result["test_images"] == 60
    assert pixel["cell_color"] > 0.95 and pixel["cell_empty"] > 0.95
    assert pixel["cell_shape"] < 0.45  # no shape planted: near the 1/6 chance of six shapes
    assert pixel["token_row"] < 0.3  # the color one-hot says nothing about the row (chance 1/8)
    assert semantic["token_row"] > 0.95 and semantic["token_row_chance"] == 1 / 8
    assert semantic["cell_color"] < 0.4  # rows only: near the 1/8 chance of eight colors


def test_probe_command_rejects_a_folder_without_scenes(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["tokenizer", "probe", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a shapes-world dataset" in capsys.readouterr().err

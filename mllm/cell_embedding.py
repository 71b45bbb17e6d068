"""Building blocks of the image-cell embeddings of `DualTokenMLLM`: the 2-layer code MLP (a summed code embedding ->
part of the LLM width), the fixed 2-D sine-cosine table that starts the learned per-cell position embedding, and
the optional coarse-region vectors added to that start."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


def grid_sincos(grid: int, width: int, rms: float = 0.05) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding of an h x w grid (row code in the first half of the width, column code in
    the second, as in ViT/MAE), (grid*grid, width), scaled to `rms` per entry: the start value of the learned
    per-cell position embedding, so every cell's place is readable from the first step."""
    quarter = width // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    axis = torch.arange(grid, dtype=torch.float64)[:, None] * freq  # (grid, quarter)
    axis = torch.cat([axis.sin(), axis.cos()], dim=1)  # (grid, 2*quarter)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    table = torch.zeros(grid, grid, width, dtype=torch.float64)
    table[..., : 4 * quarter] = torch.cat([rows, cols], dim=-1)
    table = table.reshape(grid * grid, width)
    return (table * (rms / table.pow(2).mean().sqrt())).float()


def grid_regions(grid: int, regions: int) -> torch.Tensor:
    """(grid*grid,) index of the cell of a `regions` x `regions` partition of the image that holds each grid cell's
    centre, row-major (an 8x8 grid in 3x3 regions: rows and columns 0-2, 3-4, 5-7)."""
    band = [min(regions - 1, (2 * i + 1) * regions // (2 * grid)) for i in range(grid)]
    return torch.tensor([regions * band[r] + band[c] for r in range(grid) for c in range(grid)])


def region_vectors(grid: int, regions: int, width: int, rms: float, generator=None) -> torch.Tensor:
    """(grid*grid, width): one N(0, rms^2) vector per region of `grid_regions`, repeated on each of its grid cells."""
    vectors = torch.randn(regions * regions, width, generator=generator) * rms
    return vectors[grid_regions(grid, regions)]


class CodeMLP(nn.Module):
    """2-layer MLP from a summed code embedding to (part of) the LLM width."""

    def __init__(self, code_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(code_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

"""Token sampling shared by text decoding and the depth heads: temperature, top-k, top-p, CFG mixing, and
per-row random streams.

Randomness is drawn per row from `RowGenerators`: row ``r`` of a call seeded with ``s`` samples from its own
`torch.Generator` seeded with ``s + r``. A row therefore gets the same draws whether it is decoded alone or in a
batch, which is what makes batched and one-by-one generation identical under a fixed seed. Each sampling call
consumes exactly one uniform number per row; sampling is by inverse CDF over the filtered distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RowGenerators:
    """One `torch.Generator` per batch row; `uniform()` draws one number per row."""

    def __init__(self, generators: Sequence[torch.Generator]):
        if not generators:
            raise ValueError("RowGenerators needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seed(cls, seed: int, rows: int, device: torch.device | str = "cpu") -> RowGenerators:
        """Row r gets a generator seeded with `seed + r` on `device`."""
        device = torch.device(device)
        gens = []
        for row in range(rows):
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed) + row)
            gens.append(gen)
        return cls(gens)

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: Sequence[int]) -> RowGenerators:
        """The generators of a subset of rows (same objects: their streams advance together)."""
        return RowGenerators([self.generators[r] for r in rows])

    def uniform(self, device: torch.device | str, count: int | None = None) -> torch.Tensor:
        """One U[0,1) sample per row, shape (rows,), or `count` consecutive samples of each row's stream,
        shape (rows, count) (the same numbers `count` single draws give); float32 on `device`."""
        shape = () if count is None else (count,)
        draws = [torch.rand(shape, generator=g, device=g.device) for g in self.generators]
        return torch.stack(draws).to(device=device, dtype=torch.float32)


def cfg_mix(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch whose first half is conditional and second half unconditional.

    Returns ``u + cfg_scale * (c - u)`` for the first half; `cfg_scale == 1` returns the conditional logits as is.
    """
    if logits.shape[0] % 2:
        raise ValueError(
            f"CFG needs conditional and unconditional halves, got an odd batch of {logits.shape[0]}"
        )
    cond, uncond = logits.chunk(2, dim=0)
    if cfg_scale == 1.0:
        return cond
    return torch.lerp(uncond, cond, cfg_scale)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature scaling, then top-k, then top-p (nucleus) filtering; removed entries become -inf."""
    logits = logits.float() / max(temperature, 1e-6)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_uniforms(
    generator: RowGenerators | torch.Generator | None, rows: int, device: torch.device
) -> torch.Tensor:
    """One U[0,1) number per row: from each row's own stream (`RowGenerators`, batch-invariant), or from one
    `torch.Generator` / the global RNG (then a row's draw depends on its place in the batch)."""
    if isinstance(generator, RowGenerators):
        if len(generator) != rows:
            raise ValueError(f"sample_logits: {rows} rows but {len(generator)} row generators")
        return generator.uniform(device)
    if generator is None:
        return torch.rand(rows, device=device)
    return torch.rand(rows, generator=generator, device=generator.device).to(device)


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: RowGenerators | torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one id per row from (rows, vocab) logits; `temperature <= 0` means greedy argmax.

    `uniforms` (rows,), drawn beforehand, replace the draw from `generator`.

    Sampling draws one uniform per row (see `row_uniforms`) and inverts the CDF of the filtered distribution
    taken in descending-probability order, so with `RowGenerators` the result depends only on that row's logits
    and its own stream.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if 0 < top_k < logits.shape[-1]:
        # Fast path: `topk` already returns the k candidates in descending order, so top-p and the inverse CDF
        # work on k values instead of sorting the whole vocabulary twice (the image heads sample 2*D times per
        # cell). Exactly k candidates stay (ties at the k-th value are broken by `topk`).
        values, order = torch.topk(logits.float() / max(temperature, 1e-6), top_k, dim=-1)
        probs = values.softmax(-1)
        cdf = probs.cumsum(-1)
        # The kept candidates are a prefix of the sorted ones: top-p keeps a token while the mass strictly
        # before it is below top_p. Sampling inverts the CDF over that prefix (no renormalising softmax).
        kept = top_k if not 0.0 < top_p < 1.0 else ((cdf - probs) < top_p).sum(-1, keepdim=True)
        return _invert_cdf(cdf, order, kept, logits.shape[0], generator, uniforms)
    else:
        filtered = filter_logits(logits, temperature, top_k, top_p)
        probs, order = torch.sort(filtered.softmax(-1), dim=-1, descending=True)
    # Filtered-out entries have probability 0 and sort last, so the kept ones are a prefix here too.
    return _invert_cdf(
        probs.cumsum(-1), order, (probs > 0).sum(-1, keepdim=True), logits.shape[0], generator, uniforms
    )


def _invert_cdf(
    cdf: torch.Tensor,
    order: torch.Tensor,
    kept: torch.Tensor | int,
    rows: int,
    generator: RowGenerators | torch.Generator | None,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """Inverse-CDF sampling over the first `kept` (per row, or one int) candidates of descending-probability
    lists: `cdf` (rows, n) is their cumulative probability, `order` (rows, n) their ids."""
    if uniforms is None:
        uniforms = row_uniforms(generator, rows, cdf.device)
    last = kept - 1
    total = cdf[:, -1:] if isinstance(kept, int) else cdf.gather(-1, last)
    u = uniforms.to(cdf.dtype).unsqueeze(-1) * total
    # Clamp: rounding in the cumulative sum must never land past the last kept candidate.
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=last)
    return order.gather(-1, index).squeeze(-1)

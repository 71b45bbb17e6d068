"""The depth-transformer head that turns one LLM hidden state into the D residual codes of one grid cell.

One head per DualToken branch (pixel, semantic), following VILA-U's RQ-Transformer with DualToken's changes:

- depth step 0 sees the LLM hidden state (linearly projected to the head width);
- depth step d >= 1 sees the partial reconstruction ``sum_{j<d} E[c_j]`` (cumulative sum of the frozen code
  embeddings, projected);
- a learned depth position embedding is added, a causal pre-LN transformer runs over the D steps, then a final
  LayerNorm and one classifier per depth ("D x head" in the paper figure).

Training is teacher forced over depth (`forward`). `sample` decodes the D codes one depth at a time with a
depth KV cache (each step runs one new position through the blocks). The heads run 2*D times per generated cell,
so at the tiny preset (a 4-layer LLM) they cost more than the LLM decode step itself; recomputing the depth
prefix instead (D(D+1)/2 positions per cell) made them about 1.3-2x slower at batch 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.sampling import RowGenerators, cfg_mix, sample_logits


class DepthSelfAttention(nn.Module):
    """Multi-head causal self-attention over the depth axis."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (M, S, width). With `cache` (a list, empty at depth 0, updated in place to [keys, values]) x holds
        one new step that attends to every cached step and itself."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, width // self.heads).transpose(1, 3).unbind(2)
        if cache is not None:
            if steps != 1:
                raise ValueError(f"DepthSelfAttention: a cached call takes one step, got {steps}")
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache is None, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, steps, width))


class DepthBlock(nn.Module):
    """GPT-style block: x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_attn = nn.LayerNorm(width)
        self.attn = DepthSelfAttention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cache))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class DepthHead(nn.Module):
    """Predicts the D codes of one grid cell from the LLM hidden state that precedes the cell."""

    def __init__(
        self,
        llm_hidden: int,
        code_dim: int,
        codebook_size: int,
        depth: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.depth = depth
        self.codebook_size = codebook_size
        self.hidden_in = nn.Linear(llm_hidden, width)
        self.code_in = nn.Linear(code_dim, width)
        self.depth_position = nn.Parameter(torch.randn(depth, width) * 0.02)
        self.blocks = nn.ModuleList(DepthBlock(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifier_weight = nn.Parameter(torch.randn(depth, width, codebook_size) * 0.02)
        self.classifier_bias = nn.Parameter(torch.zeros(depth, codebook_size))

    def _run(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """hidden (M, H), context (M, S-1, code_dim) partial sums -> normalised features (M, S, width)."""
        x = self.hidden_in(hidden).unsqueeze(1)
        if context.shape[1]:
            x = torch.cat([x, self.code_in(context.to(x.dtype))], dim=1)
        x = x + self.depth_position[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _classify(self, features: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        """features (M, S, width) at depths first_depth.. -> logits (M, S, K), one classifier per depth."""
        depths = slice(first_depth, first_depth + features.shape[1])
        weight, bias = self.classifier_weight[depths], self.classifier_bias[depths]
        return torch.einsum("msw,swk->msk", features, weight) + bias

    def forward(
        self, hidden: torch.Tensor, codes: torch.Tensor, code_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits (M, D, K): depth d is predicted from the hidden state and codes < d.

        hidden: (M, llm_hidden) LLM states; codes: (M, D) target codes; code_embedding: (K, code_dim) frozen table.
        """
        if codes.shape[-1] != self.depth:
            raise ValueError(f"DepthHead expects codes of depth {self.depth}, got shape {tuple(codes.shape)}")
        partial_sums = code_embedding[codes].float().cumsum(dim=1)[:, :-1]
        return self._classify(self._run(hidden, partial_sums))

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        code_embedding: torch.Tensor,
        *,
        cfg_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: RowGenerators | torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample the D codes of one cell per row, depth by depth.

        `use_cache=False` keeps no depth KV cache: every depth step reruns the blocks over the whole depth prefix
        (the model without KV caches that `GenerationSettings.use_cache=False` asks for; same codes).

        With `cfg_scale` set, `hidden` holds 2B rows (conditional first, unconditional second): at every depth the
        guided logits ``u + cfg*(c - u)`` are sampled once per row and the chosen code is fed to both halves. The
        result is (B, D) codes. `generator`: `RowGenerators` with one stream per *output* row (batch-invariant),
        a `torch.Generator`, or None for the global RNG. `temperature <= 0` is greedy.
        """
        rows = hidden.shape[0] // 2 if cfg_scale is not None else hidden.shape[0]
        codes = torch.zeros(rows, self.depth, dtype=torch.long, device=hidden.device)
        running = torch.zeros(hidden.shape[0], code_embedding.shape[-1], device=hidden.device)
        caches: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        partial_sums: list[torch.Tensor] = []
        x = self.hidden_in(hidden).unsqueeze(1)
        for d in range(self.depth):
            if use_cache:
                x = x + self.depth_position[d]
                for block, cache in zip(self.blocks, caches):
                    x = block(x, cache)
                features = self.norm(x)
            else:
                context = torch.stack(partial_sums, dim=1) if partial_sums else running[:, None][:, :0]
                features = self._run(hidden, context)[:, -1:]
            logits = self._classify(features, first_depth=d)[:, 0]
            if cfg_scale is not None:
                logits = cfg_mix(logits, cfg_scale)
            choice = sample_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            codes[:, d] = choice
            fed = choice.repeat(2) if cfg_scale is not None else choice
            if d + 1 < self.depth:
                running = running + code_embedding[fed].float()
                partial_sums.append(running)
                x = self.code_in(running.to(x.dtype)).unsqueeze(1)
        return codes

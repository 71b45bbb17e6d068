"""The depth-transformer head that turns one LLM hidden state into the D residual codes of one grid cell.

One head per DualToken branch (pixel, semantic), following VILA-U's RQ-Transformer with DualToken's changes:

- depth step 0 sees the LLM hidden state (linearly projected to the head width);
- depth step d >= 1 sees the partial reconstruction ``sum_{j<d} E[c_j]`` (cumulative sum of the frozen code
  embeddings, projected);
- a learned depth position embedding is added, a causal pre-LN transformer runs over the D steps, then a final
  LayerNorm and one classifier per depth ("D x head" in the paper figure).

Training is teacher forced over depth (`forward`). Sampling goes through `StackedDepthHeads`: the pixel and the
semantic head with their weights stacked, both decoded in one batched pass per depth with a depth KV cache (each
step runs one new position through the blocks; CFG mixes the classifier's input, which equals mixing its logits
because the classifier is affine, at half the classifier rows). The heads run D steps per generated cell, so at the tiny preset
(a 4-layer LLM) they cost more than the LLM decode step itself; with the heads as wide as the LLM (256), stacking
the two heads made image decoding about 1.8x faster at batch 8, and recomputing the depth prefix instead of caching
(D(D+1)/2 positions per cell) is about 1.3-2x slower.
"""

from __future__ import annotations

import math

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, S, width) -> (M, S, width), causal over S."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, width // self.heads).transpose(1, 3).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
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
    def set_code_prior(self, counts: torch.Tensor, uniform_share: float = 0.1) -> None:
        """Start each depth's classifier at the log code frequencies of `counts` (D, K), mixed with the uniform
        distribution at `uniform_share` so that unseen codes keep a finite logit (1e-4 for K = 1,024).

        With the bias at zero, every depth starts uniform over K codes and the first hundred or so steps go into
        pushing down the codes the data never uses; meanwhile the LLM settles on the states of a caption-blind
        solution. In the cell-generation calibration (`bench/cell_generate_paths.py`) the depth head stayed on
        that plateau for 500 steps with a zero bias and left it by step 150 with the prior.
        """
        depth, codebook = self.depth, self.codebook_size
        if counts.shape != (depth, codebook):
            raise ValueError(
                f"DepthHead.set_code_prior: counts must be (depth, codebook) = ({depth}, {codebook}), "
                f"got {tuple(counts.shape)}"
            )
        if not 0.0 < uniform_share <= 1.0:
            raise ValueError(
                f"DepthHead.set_code_prior: uniform_share must lie in (0, 1], got {uniform_share}"
            )
        counts = counts.to(torch.float64)
        totals = counts.sum(dim=1, keepdim=True)
        if bool((totals <= 0).any()) or bool((counts < 0).any()):
            raise ValueError("DepthHead.set_code_prior: counts must be >= 0 with at least one code per depth")
        prior = (1.0 - uniform_share) * counts / totals + uniform_share / counts.shape[1]
        bias = self.classifier_bias
        if hasattr(bias, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: gather, write on rank 0, re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([bias], modifier_rank=0):
                bias.data.copy_(prior.log().to(bias.dtype))
        else:
            bias.copy_(prior.log().to(bias.dtype))

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
        cfg_plausibility: float = 0.0,
    ) -> torch.Tensor:
        """Sample the D codes of one cell per row, depth by depth (`StackedDepthHeads` over this head alone).

        `use_cache=False` keeps no depth KV cache: every depth step reruns the blocks over the whole depth prefix
        (the model without KV caches that `GenerationSettings.use_cache=False` asks for; same codes).

        With `cfg_scale` set, `hidden` holds 2B rows (conditional first, unconditional second): at every depth the
        guided logits ``u + cfg*(c - u)`` are sampled once per row and the chosen code is fed to both halves. The
        result is (B, D) codes. `cfg_plausibility` > 0 keeps, at every depth, only the codes whose conditional
        probability is at least that fraction of the most likely conditional code (see `plausible_only`).
        `generator`: `RowGenerators` with one stream per *output* row (batch-invariant),
        a `torch.Generator`, or None for the global RNG. `temperature <= 0` is greedy.
        """
        (codes,) = StackedDepthHeads([self], [code_embedding]).sample(
            hidden,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            use_cache=use_cache,
            cfg_plausibility=cfg_plausibility,
        )
        return codes


def plausible_only(guided: torch.Tensor, conditional: torch.Tensor, plausibility: float) -> torch.Tensor:
    """Mask (in place, to -inf) the guided logits of every code whose conditional probability is below
    `plausibility` times the row's most likely conditional code, and return `guided`.

    CFG's ``u + s(c - u)`` rewards any code that the unconditional branch finds even less likely than the
    conditional one, however unlikely both find it: a model sure that *some* object goes in a cell (unconditional)
    but sure which one (conditional) gets the background there boosted past the object at s = 3. Restricting the
    guided choice to codes the conditional model finds plausible (the adaptive plausibility constraint of
    contrastive decoding) keeps guidance to choosing among them."""
    logp = conditional.float().log_softmax(dim=-1)
    floor = logp.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return guided.masked_fill_(logp < floor, float("-inf"))


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class _StackedLinear:
    """n `nn.Linear`s of one shape applied to (n, M, in) inputs with one batched matmul. With `norms`, the
    LayerNorms in front of them are folded in: LN(x) W + c = LN0(x) (g W) + (b W + c), where LN0 is the
    LayerNorm without its affine (g, b), so the caller normalises with `_layer_norm` and saves one op."""

    def __init__(self, layers: list[nn.Linear], norms: list[nn.LayerNorm] | None = None):
        weight = _stack([layer.weight.t() for layer in layers])  # (n, in, out)
        bias = _stack([layer.bias for layer in layers]).unsqueeze(1)  # (n, 1, out)
        if norms is not None:
            gain = _stack([norm.weight for norm in norms])  # (n, in)
            shift = _stack([norm.bias for norm in norms]).unsqueeze(1)  # (n, 1, in)
            bias = bias + torch.bmm(shift, weight)
            weight = gain.unsqueeze(-1) * weight
        self.weight, self.bias = weight.contiguous(), bias

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, M, in) -> (n, M, out); `bias` (n, 1, out) replaces the layer's own."""
        return torch.baddbmm(self.bias if bias is None else bias, x, self.weight)


def _layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class StackedDepthHeads:
    """Sampling-time view of depth heads of one shape (the pixel and the semantic head) with their weights
    stacked on a leading head axis, so each depth step runs every head in one batched pass: half the small
    kernel calls of running the heads one after the other, which is what a generated cell costs at the tiny
    preset. Build it once per generation call: it copies the heads' transformer weights (not their classifiers),
    so it does not follow later updates.

    Randomness: each row draws its uniforms for a whole cell at once, head by head and depth by depth (pixel
    depths before semantic depths), which is the order in which sampling the heads one after the other draws them.
    """

    def __init__(self, heads: list[DepthHead], code_embeddings: list[torch.Tensor]):
        if not heads or len(heads) != len(code_embeddings):
            raise ValueError("StackedDepthHeads needs one code embedding table per head")
        first = heads[0]
        self.depth, self.count = first.depth, len(heads)
        self.attn_heads = first.blocks[0].attn.heads
        self.hidden_in = _StackedLinear([h.hidden_in for h in heads])
        self.code_in = _StackedLinear([h.code_in for h in heads])
        # The depth position embedding is folded into the input projections' biases: depth 0 is the projected
        # LLM state, depth d >= 1 the projected partial sum; (n, D, 1, width).
        position = _stack([h.depth_position for h in heads]).unsqueeze(2)
        self.input_bias = torch.cat(
            [
                self.hidden_in.bias.unsqueeze(1) + position[:, :1],
                self.code_in.bias.unsqueeze(1) + position[:, 1:],
            ],
            dim=1,
        )
        self.eps = first.norm.eps
        self.blocks = [
            {
                "qkv": _StackedLinear(
                    [h.blocks[i].attn.qkv for h in heads], [h.blocks[i].ln_attn for h in heads]
                ),
                "proj": _StackedLinear([h.blocks[i].attn.proj for h in heads]),
                "fc1": _StackedLinear(
                    [h.blocks[i].mlp[0] for h in heads], [h.blocks[i].ln_mlp for h in heads]
                ),
                "fc2": _StackedLinear([h.blocks[i].mlp[2] for h in heads]),
            }
            for i in range(len(first.blocks))
        ]
        # The final LayerNorm's affine stays explicit and the classifiers are used in place (no copy): at the paper
        # preset they hold D x width x K = 134M weights per head.
        self.norm_weight = _stack([h.norm.weight for h in heads]).unsqueeze(1)  # (n, 1, width)
        self.norm_bias = _stack([h.norm.bias for h in heads]).unsqueeze(1)
        self.classifiers = [(h.classifier_weight, h.classifier_bias) for h in heads]  # (D, width, K), (D, K)
        self.code_embeddings = _stack([table.float() for table in code_embeddings])  # (n, K, code_dim)

    def _attention(self, block: dict, x: torch.Tensor, cache: torch.Tensor | None, step: int) -> torch.Tensor:
        """x (n, M, S, width): the depth steps to run. With `cache` (a preallocated (2, n*M, heads, D, head_dim)
        key/value buffer) x holds the one new step `step`, written into the buffer in place."""
        n, rows, steps, width = x.shape
        qkv = block["qkv"](x.reshape(n, rows * steps, width))
        q, k, v = qkv.view(n * rows, steps, 3, self.attn_heads, -1).transpose(1, 3).unbind(2)
        if cache is not None:
            cache[0, :, :, step] = k[:, :, 0]
            cache[1, :, :, step] = v[:, :, 0]
            k, v = cache[0, :, :, : step + 1], cache[1, :, :, : step + 1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        return block["proj"](out.transpose(1, 2).reshape(n, rows * steps, width)).view(n, rows, steps, width)

    def _features(self, x: torch.Tensor, caches: list[torch.Tensor] | None, step: int) -> torch.Tensor:
        """(n, M, S, width) embedded depth steps -> normalised features of the last step (n, M, width)."""
        n, rows, steps, width = x.shape
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = x + self._attention(block, _layer_norm(x, self.eps), cache, step)
            flat = x.reshape(n, rows * steps, width)
            flat = flat + block["fc2"](F.gelu(block["fc1"](_layer_norm(flat, self.eps))))
            x = flat.view(n, rows, steps, width)
        return torch.addcmul(self.norm_bias, _layer_norm(x[:, :, -1], self.eps), self.norm_weight)

    def _uniforms(self, generator, rows: int, device: torch.device) -> torch.Tensor:
        """(n, D, rows) uniforms in the order one-head-at-a-time sampling would draw them."""
        draws = self.count * self.depth
        if isinstance(generator, RowGenerators):
            if len(generator) != rows:
                raise ValueError(f"StackedDepthHeads: {rows} rows but {len(generator)} row generators")
            u = generator.uniform(device, count=draws).t()
        elif generator is None:
            u = torch.rand(draws, rows, device=device)
        else:
            u = torch.rand(draws, rows, generator=generator, device=generator.device).to(device)
        return u.reshape(self.count, self.depth, rows)

    @torch.no_grad()
    def sample(
        self,
        hidden: torch.Tensor,
        *,
        cfg_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: RowGenerators | torch.Generator | None = None,
        use_cache: bool = True,
        cfg_plausibility: float = 0.0,
    ) -> list[torch.Tensor]:
        """The D codes of one cell per row for every head: a list of (B, D) tensors, in head order (see
        `DepthHead.sample` for `hidden`, CFG, `cfg_plausibility`, sampling and `use_cache`)."""
        n, total = self.count, hidden.shape[0]
        rows = total // 2 if cfg_scale is not None else total
        uniforms = self._uniforms(generator, rows, hidden.device) if temperature > 0 else None
        codes = torch.zeros(n, rows, self.depth, dtype=torch.long, device=hidden.device)
        stacked = hidden.unsqueeze(0).expand(n, -1, -1).to(self.hidden_in.weight.dtype)
        # Embedded depth inputs (positions included), each (n, total, width).
        steps = [self.hidden_in(stacked, self.input_bias[:, 0])]
        width = self.input_bias.shape[-1]
        cache_shape = (2, n * total, self.attn_heads, self.depth, width // self.attn_heads)
        caches = [stacked.new_empty(cache_shape) for _ in self.blocks] if use_cache else None
        running = hidden.new_zeros(n, total, self.code_embeddings.shape[-1], dtype=torch.float32)
        heads = torch.arange(n, device=hidden.device)[:, None]
        weight, _ = self.classifiers[0]
        logits = weight.new_empty(n, rows, weight.shape[-1])
        for d in range(self.depth):
            x = steps[-1].unsqueeze(2) if use_cache else torch.stack(steps, dim=2)
            features = self._features(x, caches, d)
            conditional = features[:, :rows] if cfg_scale is not None and cfg_plausibility > 0 else None
            if cfg_scale is not None:
                # The classifier is affine, so guiding its input equals guiding its logits:
                # W(u + s(c - u)) + b = (Wu + b) + s((Wc + b) - (Wu + b)); half the classifier rows.
                features = cfg_mix(features.transpose(0, 1), cfg_scale).transpose(0, 1)
            for i, (weight, bias) in enumerate(self.classifiers):
                torch.addmm(bias[d], features[i], weight[d], out=logits[i])
                if conditional is not None:
                    plausible_only(
                        logits[i], torch.addmm(bias[d], conditional[i], weight[d]), cfg_plausibility
                    )
            choice = sample_logits(
                logits.view(n * rows, -1),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                uniforms=uniforms[:, d].reshape(-1) if uniforms is not None else None,
            ).view(n, rows)
            codes[:, :, d] = choice
            if d + 1 < self.depth:
                fed = choice.repeat(1, 2) if cfg_scale is not None else choice
                running = running + self.code_embeddings[heads, fed]
                steps.append(self.code_in(running.to(stacked.dtype), self.input_bias[:, d + 1]))
        return list(codes.unbind(0))

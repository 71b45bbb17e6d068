"""`ResidualQuantizer`: residual VQ with one EMA codebook shared across depths (the official RQ-VAE-style bottleneck).

Behaviour (official `quantizations.py` / `quantizations_ema.py`, notes section 2.2):
- Encoding: the residual starts as ``x.detach()``; at each depth d the L2-nearest code of the residual is picked
  (``argmin ||r||^2 + ||e||^2 - 2 r.e`` in fp32), subtracted from the residual and added to the running sum
  ``q_d``. Codes come out shaped ``(..., D)``.
- Straight-through: the output is ``x + (q_D - x).detach()``, so gradients reach the encoder unchanged.
- Commitment loss on the cumulative sums: ``mean_d MSE(x, sg(q_d))``. There is no codebook loss; the codebook is a
  buffer updated by EMA (no gradients).
- EMA (training only): per code, ``N <- decay N + (1-decay) n`` and ``S <- decay S + (1-decay) sum(r)``, with the
  counts and sums all-reduced across ranks when `torch.distributed` is initialized; the codebook is
  ``S / N'`` with Laplace-smoothed ``N' = n (N + eps) / (n + K eps)``.
- Dead-code restart at every update: codes with ``N < dead_code_threshold`` get ``S <- a random batch vector`` and
  ``N <- 1``; the batch is tiled with small uniform noise when it has fewer than K vectors, and rank 0's choice is
  broadcast so every rank keeps the same codebook.
- ``update_mode="per_depth"`` updates the shared codebook inside every depth step (official ``rq``, pixels);
  ``"after_depths"`` does a single fp32 update with the residuals of all depths after the loop (official
  ``rq_ema``, semantics).
- Initialisation: codebook ~ N(0, 1), EMA sums = codebook, counts = 0 (so the first update restarts every code
  from the batch, a data-dependent initialisation).

Why hand-written: `vector-quantize-pytorch` (not installed here) has a shared-codebook `ResidualVQ` with EMA,
dead-code expiry and codebook sync, but it cannot express this quantizer exactly: its commitment loss is taken per
layer on each layer's residual (``||r_d - sg(e_d)||^2``), not on the cumulative sums against the input; it updates
after every layer and has no single after-all-depths update; its dead-code expiry and cluster-size bookkeeping
differ from the official restart (count reset to 1, Laplace-smoothed division). Matching the official numbers
therefore needs the ~150 lines below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

UPDATE_MODES = ("per_depth", "after_depths")


@dataclass
class QuantizerOutput:
    """quantized: straight-through ``q_D`` (same shape as the input); codes: (..., D) long;
    commitment_loss: ``mean_d MSE(x, sg(q_d))``; cumulative: the D partial sums ``q_d`` (detached)."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor
    cumulative: list[torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def commitment_loss(x: torch.Tensor, cumulative: list[torch.Tensor]) -> torch.Tensor:
    """``mean_d MSE(x, sg(q_d))`` over the cumulative quantizations ``q_1..q_D``."""
    return torch.stack([F.mse_loss(x, q.detach().to(x.dtype)) for q in cumulative]).mean()


class ResidualQuantizer(nn.Module):
    """Residual VQ of depth `depth` over one shared (codebook_size, code_dim) EMA codebook."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        depth: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        update_mode: str = "per_depth",
    ):
        super().__init__()
        if update_mode not in UPDATE_MODES:
            raise ValueError(
                f"ResidualQuantizer.update_mode: expected one of {UPDATE_MODES}, got {update_mode!r}"
            )
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.depth = depth
        self.decay = decay
        self.eps = eps
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.update_mode = update_mode
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("cluster_size_ema", torch.zeros(codebook_size))
        self.register_buffer("embed_ema", self.codebook.clone())

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, depth={self.depth}, "
            f"decay={self.decay}, update_mode={self.update_mode!r}"
        )

    @torch.no_grad()
    def reset_codebook(self) -> None:
        """Codebook ~ N(0, 1), EMA sums = codebook, counts = 0 (uses the guarded HF init functions, so loaded
        buffers are left alone inside `from_pretrained`)."""
        init.normal_(self.codebook, mean=0.0, std=1.0)
        init.copy_(self.embed_ema, self.codebook)
        init.zeros_(self.cluster_size_ema)

    # ------------------------------------------------------------------ lookup
    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the L2-nearest code for each vector (..., code_dim) -> (...) long, computed in fp32."""
        flat = vectors.reshape(-1, self.code_dim).float()
        codebook = self.codebook.float()
        device_type = vectors.device.type if vectors.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type, enabled=False):  # bf16 autocast would round the distances
            distances = torch.addmm(
                flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None],
                flat,
                codebook.t(),
                alpha=-2.0,
            )
        return distances.argmin(dim=-1).reshape(vectors.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-depth code vectors: (..., D) long -> (..., D, code_dim)."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"ResidualQuantizer.lookup: codes must be integers, got {codes.dtype}")
        checkable = codes.numel() and codes.device.type != "meta"  # meta tensors carry shapes only
        if checkable and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"ResidualQuantizer.lookup: codes must lie in [0, {self.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return F.embedding(codes.long(), self.codebook)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The quantized latent ``q_D`` (sum over depth): (..., D) -> (..., code_dim)."""
        if codes.shape[-1] != self.depth:
            raise ValueError(
                f"ResidualQuantizer.decode_codes: the last axis must be the depth {self.depth}, got shape "
                f"{tuple(codes.shape)}"
            )
        return self.lookup(codes).sum(dim=-2)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize x (..., code_dim). `update` (default: `self.training`) applies the EMA / restart updates."""
        if x.shape[-1] != self.code_dim:
            raise ValueError(
                f"ResidualQuantizer: expected a last axis of {self.code_dim}, got {tuple(x.shape)}"
            )
        update = self.training if update is None else update
        residual = x.detach().float().clone()
        total = torch.zeros_like(residual)
        cumulative: list[torch.Tensor] = []
        codes: list[torch.Tensor] = []
        cached: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(self.depth):
            idx = self.nearest(residual)
            quant = F.embedding(idx, self.codebook).float()  # looked up before any update of this step
            if update and self.update_mode == "per_depth":
                self.ema_update(residual, idx)
            elif update:
                cached.append((residual, idx))  # `residual` is rebound below, never modified in place
            residual = residual - quant
            total = total + quant
            cumulative.append(total)
            codes.append(idx)
        if cached:
            self.ema_update(
                torch.cat([v.reshape(-1, self.code_dim) for v, _ in cached]),
                torch.cat([i.reshape(-1) for _, i in cached]),
            )
        loss = commitment_loss(x, cumulative)
        quantized = x + (total.to(x.dtype) - x).detach()
        return QuantizerOutput(quantized, torch.stack(codes, dim=-1), loss, cumulative)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def ema_update(self, vectors: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step with `vectors` (..., code_dim) assigned to codes `idx` (...), then dead-code restart and
        the codebook refresh. Counts and sums are summed over ranks when torch.distributed is initialized."""
        vectors = vectors.reshape(-1, self.code_dim).float()
        idx = idx.reshape(-1)
        counts = torch.zeros(self.codebook_size, device=vectors.device, dtype=torch.float32)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        sums = torch.zeros(self.codebook_size, self.code_dim, device=vectors.device, dtype=torch.float32)
        sums.index_add_(0, idx, vectors)
        if _distributed():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.cluster_size_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_ema.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.restart_dead_codes:
            self._restart_dead_codes(vectors)
        n = self.cluster_size_ema.sum()
        smoothed = n * (self.cluster_size_ema + self.eps) / (n + self.codebook_size * self.eps)
        self.codebook.copy_(self.embed_ema / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, vectors: torch.Tensor) -> None:
        if len(vectors) < self.codebook_size:
            repeats = -(-self.codebook_size // len(vectors))
            noise_scale = 0.01 / self.code_dim**0.5
            vectors = vectors.repeat(repeats, 1)
            vectors = vectors + torch.rand_like(vectors) * noise_scale
        candidates = vectors[
            torch.randperm(len(vectors), device=vectors.device)[: self.codebook_size]
        ].contiguous()
        if _distributed():
            dist.broadcast(candidates, 0)
        alive = (self.cluster_size_ema >= self.dead_code_threshold).float()
        self.embed_ema.mul_(alive[:, None]).add_(candidates * (1 - alive[:, None]))
        self.cluster_size_ema.mul_(alive).add_(1 - alive)

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> torch.Tensor:
        """How often each code occurs in `codes` (any shape): (codebook_size,) float counts."""
        return torch.bincount(codes.reshape(-1).long(), minlength=self.codebook_size).float()

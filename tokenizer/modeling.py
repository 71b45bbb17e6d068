"""`DualTokenModel`: the DualToken tokenizer as an HF `PreTrainedModel` (safetensors `save_pretrained` /
`from_pretrained`), following the official HEAD forward pass (notes section 2.1):

    pixels [-1,1] -> SigLIP patch embedding -> encoder layers 1..semantic_layer
      layer `shortcut_layer` output -> prequant_shortcut (attn projection hidden -> code_dim)  --+ x shortcut_weight
      layer `pixel_layer` output    -> prequant_pixel    (hidden -> code_dim) -------------------+-> pixel RQ
            -> postquant_pixel (causal attn projection code_dim -> hidden) -> (N, hidden, g, g) -> PixelDecoder -> image
      layer `semantic_layer` output -> prequant_semantic (hidden -> code_dim) -> semantic RQ
            -> postquant_semantic (causal, code_dim -> hidden) = semantic tokens, which REPLACE the residual stream
            -> remaining encoder layers -> post_layernorm -> MAP pooling head -> pooled image embedding

The backbone is a transformers `SiglipVisionModel` (built from `config.vision_config`, or initialised from a local
directory with `from_pretrained_backbone`). Post-quant projections attend causally in raster order, so the output
at a grid cell depends only on the codes of that cell and the cells before it.

Public surface (used by `mllm/` and the training / evaluation code):
    encode(pixels (N,3,H,W) in [-1,1]) -> DualCodes(pixel (N,g,g,D), semantic (N,g,g,D)) long
    decode(pixel_codes (N,g,g,D)) -> images (N,3,H,W) in [-1,1] (not clamped)
    embed_codes(codes, branch) -> quantized latent (N,g,g,code_dim) (sum of the D code vectors)
    image_embedding(pixels) / embedding_from_codes(semantic_codes) -> pooled (N, hidden), L2-normalised
    codebook(branch) -> (K, code_dim); grid_size; config.codebook_size / code_dim / rq_depth / image_size
    forward(pixels, teacher=None, perceptual=None) -> DualTokenOutput with every loss term (training)
Inference methods never update the EMA codebooks; `forward` does in training mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SiglipVisionModel
from transformers import initialization as init

from tokenizer.configuration import DualTokenConfig
from tokenizer.losses import reconstruction_losses, semantic_losses, teacher_targets
from tokenizer.pixel_decoder import PixelDecoder
from tokenizer.quantizer import ResidualQuantizer

BRANCHES = ("pixel", "semantic")


@dataclass(frozen=True)
class DualCodes:
    """The two code grids of a batch of images, each (N, h, w, D) long."""

    pixel: torch.Tensor
    semantic: torch.Tensor

    def to(self, device: torch.device | str) -> DualCodes:
        return DualCodes(self.pixel.to(device), self.semantic.to(device))


@dataclass
class DualTokenOutput:
    """What `DualTokenModel.forward` returns to a training loop.

    reconstruction: (N, 3, H, W) decoded image; codes: DualCodes; semantic_tokens: (N, L, hidden) post-quant tokens
    (the distillation student); pooled: (N, hidden) pooled output of the quantized semantic path; losses: every
    term by name (unweighted "commit_pixel", "commit_semantic", "recon_l2", ["recon_lpips"], ["sem_token_mse",
    "sem_token_cos", "sem_pool_mse", "sem_pool_cos"]; weighted "commitment", "reconstruction", ["semantic"]; and
    "nll" = MSE + lpips_weight * LPIPS for the adaptive GAN weight); loss: the weighted total without the GAN term;
    last_layer: the decoder's conv_out weight (for `tokenizer.losses.generator_adversarial_loss`)."""

    reconstruction: torch.Tensor
    codes: DualCodes
    semantic_tokens: torch.Tensor
    pooled: torch.Tensor
    loss: torch.Tensor
    last_layer: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- projections


class ProjectionAttention(nn.Module):
    """The official `AttentionBlock` of `AttnProjection`: width = max(in, out) split into `num_heads` heads; q and v
    biases are learned, the k bias is zero. Down-projection (in > out): the heads are averaged (adaptive-pooled to
    `out_dim` if the head width differs); up-projection: the heads are concatenated. Then a Linear(out, out)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool):
        super().__init__()
        width = max(in_dim, out_dim)
        if width % num_heads:
            raise ValueError(f"ProjectionAttention: width {width} is not divisible by {num_heads} heads")
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (b, heads, n, head_dim)
        if self.in_dim > self.out_dim:
            y = y.mean(dim=1)
            if self.head_dim != self.out_dim:
                y = F.adaptive_avg_pool1d(y, self.out_dim)
        else:
            y = y.transpose(1, 2).reshape(b, n, -1)
        return self.proj(y)


class GeGluMlp(nn.Module):
    """LayerNorm(eps 1e-6) -> gelu_tanh(W0 x) * W1 x -> W2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class AttnProjection(nn.Module):
    """``y = Linear(LN(x)) + Attn(LN(x)); y = y + GeGLU(LN(y))`` mapping in_dim -> out_dim (UniTok / DualToken).
    With `attention=False` the Attn term is absent and each token is mapped on its own."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_heads: int,
        causal: bool = False,
        mlp_ratio: float = 2.0,
        attention: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim) if attention else None
        self.attn = ProjectionAttention(in_dim, out_dim, num_heads, causal) if attention else None
        self.norm3 = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm3(x))
        if self.attn is not None:
            y = y + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


# ---------------------------------------------------------------------------------------------------- model


class DualTokenModel(PreTrainedModel):
    """The DualToken tokenizer (see the module docstring)."""

    config_class = DualTokenConfig
    config: DualTokenConfig
    base_model_prefix = "dualtoken"
    main_input_name = "pixels"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: DualTokenConfig):
        super().__init__(config)
        hidden, dim = config.hidden_size, config.code_dim
        heads = hidden // dim
        ratio = config.projection_mlp_ratio
        self.backbone = SiglipVisionModel(config.vision_config)
        self.prequant_pixel = AttnProjection(
            hidden, dim, heads, causal=False, mlp_ratio=ratio, attention=config.pixel_projection_attention
        )
        self.prequant_shortcut = (
            AttnProjection(hidden, dim, heads, causal=False, mlp_ratio=ratio)
            if config.shortcut_layer is not None
            else None
        )
        self.prequant_semantic = AttnProjection(hidden, dim, heads, causal=False, mlp_ratio=ratio)
        quantizer_args = {
            "codebook_size": config.codebook_size,
            "code_dim": dim,
            "depth": config.rq_depth,
            "decay": config.ema_decay,
            "eps": config.ema_eps,
            "restart_dead_codes": config.restart_dead_codes,
            "dead_code_threshold": config.dead_code_threshold,
        }
        self.quantizer_pixel = ResidualQuantizer(**quantizer_args, update_mode=config.pixel_ema_update)
        self.quantizer_semantic = ResidualQuantizer(**quantizer_args, update_mode=config.semantic_ema_update)
        self.postquant_pixel = AttnProjection(dim, hidden, heads, causal=True, mlp_ratio=ratio)
        self.postquant_semantic = AttnProjection(dim, hidden, heads, causal=True, mlp_ratio=ratio)
        self.decoder = PixelDecoder(
            token_channels=hidden,
            in_channels=config.decoder_in_channels,
            channels=config.decoder_channels,
            channel_mult=config.decoder_channel_mult,
            res_blocks=config.decoder_res_blocks,
            attn_resolutions=config.decoder_attn_resolutions,
            latent_size=config.latent_size,
            dropout=config.decoder_dropout,
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch defaults for our layers (as the official code), N(0,1) codebooks; the SigLIP backbone keeps its
        own init (transformers dispatches sub-models to their `_init_weights`)."""
        if isinstance(module, ResidualQuantizer):
            module.reset_codebook()
        elif isinstance(module, ProjectionAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()

    @classmethod
    def from_pretrained_backbone(cls, backbone_dir: str | os.PathLike, **config_fields) -> DualTokenModel:
        """A new tokenizer whose SigLIP tower is copied from a local SiglipVisionModel (or SiglipModel) directory;
        `config_fields` are the other `DualTokenConfig` fields. Projections, quantizers and decoder are fresh."""
        backbone = SiglipVisionModel.from_pretrained(backbone_dir, dtype=torch.float32)
        config = DualTokenConfig(vision_config=backbone.config.to_dict(), **config_fields)
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    # ------------------------------------------------------------------ geometry
    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def quantizer(self, branch: str) -> ResidualQuantizer:
        if branch == "pixel":
            return self.quantizer_pixel
        if branch == "semantic":
            return self.quantizer_semantic
        raise ValueError(f"DualTokenModel: branch must be one of {BRANCHES}, got {branch!r}")

    def codebook(self, branch: str) -> torch.Tensor:
        """A copy of the branch's (codebook_size, code_dim) codebook."""
        return self.quantizer(branch).codebook.detach().clone()

    def _check_pixels(self, pixels: torch.Tensor, caller: str) -> torch.Tensor:
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"DualTokenModel.{caller}: expected pixels (N, 3, {size}, {size}) in [-1, 1] "
                f"(tokenizer.image_processing.preprocess(images, image_size={size})), got {tuple(pixels.shape)}"
            )
        param = self.backbone.embeddings.patch_embedding.weight
        return pixels.to(device=param.device, dtype=param.dtype)

    def _check_codes(self, codes: torch.Tensor, caller: str) -> torch.Tensor:
        g, depth = self.grid_size, self.config.rq_depth
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (g, g, depth):
            raise ValueError(
                f"DualTokenModel.{caller}: expected codes (N, {g}, {g}, {depth}), got {tuple(codes.shape)}"
            )
        return codes.to(self.quantizer_pixel.codebook.device)

    # ------------------------------------------------------------------ tower
    def _tower_to_semantic_layer(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run layers 1..semantic_layer; returns the pre-quant pixel latent (N, L, code_dim) (shortcut included)
        and the pre-quant semantic latent (N, L, code_dim)."""
        cfg = self.config
        hidden = self.backbone.embeddings(pixels)
        pixel_latent = shortcut = semantic_latent = None
        if cfg.pixel_layer == 0:
            pixel_latent = self.prequant_pixel(hidden)
        for i, layer in enumerate(self.backbone.encoder.layers[: cfg.semantic_layer], start=1):
            hidden = layer(hidden, None)
            if i == cfg.shortcut_layer:
                shortcut = self.prequant_shortcut(hidden)
            if i == cfg.pixel_layer:
                pixel_latent = self.prequant_pixel(hidden)
            if i == cfg.semantic_layer:
                semantic_latent = self.prequant_semantic(hidden)
        if shortcut is not None:
            pixel_latent = pixel_latent + cfg.shortcut_weight * shortcut
        return pixel_latent, semantic_latent

    def _to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length, width = tokens.shape
        return tokens.reshape(n, self.grid_size, self.grid_size, width)

    def _tower_after_semantic_layer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Semantic tokens (N, L, hidden) -> remaining layers -> post-LN -> pooling head -> (N, hidden)."""
        hidden = tokens
        for layer in self.backbone.encoder.layers[self.config.semantic_layer :]:
            hidden = layer(hidden, None)
        return self.backbone.head(self.backbone.post_layernorm(hidden))

    def _decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantized pixel latent (N, g, g, code_dim) -> image (N, 3, H, W)."""
        n, g, _, dim = latent.shape
        tokens = self.postquant_pixel(latent.reshape(n, g * g, dim))
        return self.decoder(tokens.reshape(n, g, g, -1).permute(0, 3, 1, 2).contiguous())

    # ------------------------------------------------------------------ inference API
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> DualCodes:
        """Pixels (N, 3, H, W) in [-1, 1] -> DualCodes(pixel, semantic), each (N, g, g, D) long."""
        pixels = self._check_pixels(pixels, "encode")
        pixel_latent, semantic_latent = self._tower_to_semantic_layer(pixels)
        pixel = self.quantizer_pixel(self._to_grid(pixel_latent), update=False).codes
        semantic = self.quantizer_semantic(self._to_grid(semantic_latent), update=False).codes
        return DualCodes(pixel, semantic)

    def embed_codes(self, codes: torch.Tensor, branch: str) -> torch.Tensor:
        """Codes (N, g, g, D) -> the branch's quantized latent (N, g, g, code_dim), the sum of the D code vectors."""
        return self.quantizer(branch).decode_codes(self._check_codes(codes, "embed_codes"))

    @torch.no_grad()
    def decode(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        """Pixel codes (N, g, g, D) -> images (N, 3, H, W), nominally in [-1, 1] (not clamped)."""
        latent = self.embed_codes(pixel_codes, "pixel")
        return self._decode_latent(latent.to(self.decoder.conv_out.weight.dtype))

    @torch.no_grad()
    def embedding_from_codes(self, semantic_codes: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Semantic codes (N, g, g, D) -> pooled image embedding (N, hidden) through the rest of the tower."""
        latent = self.embed_codes(semantic_codes, "semantic")
        n, g, _, dim = latent.shape
        param = self.backbone.post_layernorm.weight
        tokens = self.postquant_semantic(latent.reshape(n, g * g, dim).to(param.dtype))
        pooled = self._tower_after_semantic_layer(tokens)
        return F.normalize(pooled.float(), dim=-1) if normalize else pooled

    @torch.no_grad()
    def image_embedding(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pixels -> pooled embedding of the quantized semantic path (N, hidden), for zero-shot / retrieval.
        Equals `embedding_from_codes(encode(pixels).semantic)`."""
        return self.embedding_from_codes(self.encode(pixels).semantic, normalize=normalize)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        pixels: torch.Tensor,
        teacher: nn.Module | tuple[torch.Tensor, torch.Tensor] | None = None,
        perceptual: nn.Module | None = None,
    ) -> DualTokenOutput:
        """Full pass with every loss term. `teacher`: the frozen SigLIP (SiglipVisionModel / SiglipModel) or its
        precomputed (layer-`semantic_layer` tokens, pooled) pair; without it the semantic terms are absent.
        `perceptual`: an LPIPS module (`tokenizer.losses.load_perceptual`), or None. In training mode the EMA
        codebooks update. The GAN term is added by the loop (`tokenizer.losses.generator_adversarial_loss`)."""
        cfg = self.config
        pixels = self._check_pixels(pixels, "forward")
        pixel_latent, semantic_latent = self._tower_to_semantic_layer(pixels)
        pixel_q = self.quantizer_pixel(self._to_grid(pixel_latent))
        semantic_q = self.quantizer_semantic(self._to_grid(semantic_latent))
        n, g = pixels.shape[0], self.grid_size
        tokens = self.postquant_semantic(semantic_q.quantized.reshape(n, g * g, -1))
        pooled = self._tower_after_semantic_layer(tokens)
        reconstruction = self._decode_latent(pixel_q.quantized)

        losses: dict[str, torch.Tensor] = {
            "commit_pixel": pixel_q.commitment_loss,
            "commit_semantic": semantic_q.commitment_loss,
        }
        losses["commitment"] = cfg.commitment_weight * (pixel_q.commitment_loss + semantic_q.commitment_loss)
        losses.update(reconstruction_losses(cfg, reconstruction, pixels, perceptual))
        total = losses["commitment"] + losses["reconstruction"]
        if teacher is not None:
            if isinstance(teacher, nn.Module):
                target_tokens, target_pooled = teacher_targets(teacher, pixels, cfg.semantic_layer)
            else:
                target_tokens, target_pooled = teacher
            losses.update(
                semantic_losses(cfg, tokens, pooled, target_tokens.detach(), target_pooled.detach())
            )
            total = total + losses["semantic"]
        return DualTokenOutput(
            reconstruction=reconstruction,
            codes=DualCodes(pixel_q.codes, semantic_q.codes),
            semantic_tokens=tokens,
            pooled=pooled,
            loss=total,
            last_layer=self.decoder.last_layer,
            losses=losses,
        )

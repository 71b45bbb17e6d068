"""The pixel decoder: quantized pixel tokens -> image, the taming / RQ-VAE conv decoder the official code uses.

`PixelDecoder` takes the post-quant projected pixel tokens laid out as a (N, hidden, h, w) map and
1. resizes them bilinearly to `latent_size` (paper 27 -> 24; identity when equal),
2. maps hidden -> `in_channels` with a `PostQuantResnetBlock` (GN-SiLU-1x1 conv, GN-SiLU-3x3 conv, 1x1 shortcut),
3. runs the taming `Decoder`: conv_in, mid (res, attention, res), then for each level of `channel_mult` walked in
   reverse `res_blocks + 1` residual blocks (attention after each where the resolution is listed), nearest x2
   upsample + conv between levels, GroupNorm(32) - SiLU - conv_out to RGB. No output activation: targets are in
   [-1, 1]. Paper: ch 128, mult (1, 1, 4, 4, 8), 2 res blocks, attention at 24, 1024 input channels, 24 -> 384.

`conv_out.weight` is the "last layer" the adaptive GAN weight differentiates through (`last_layer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3, GN-SiLU-dropout-conv3x3, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, first_kernel: int = 3):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, first_kernel, padding=first_kernel // 2)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class PostQuantResnetBlock(ResnetBlock):
    """The official post-quant block: like `ResnetBlock` but its first conv is 1x1."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__(in_channels, out_channels, dropout, first_kernel=1)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/out convs and a residual (taming)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DecoderLevel(nn.Module):
    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], upsample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.upsample = upsample


class PixelDecoder(nn.Module):
    """Post-quant block + taming decoder; `forward(tokens_map)` -> (N, 3, image_size, image_size)."""

    def __init__(
        self,
        token_channels: int,
        in_channels: int,
        channels: int,
        channel_mult: Sequence[int],
        res_blocks: int,
        attn_resolutions: Sequence[int],
        latent_size: int,
        dropout: float = 0.0,
        out_channels: int = 3,
    ):
        super().__init__()
        self.latent_size = latent_size
        self.post_quant = PostQuantResnetBlock(token_channels, in_channels, dropout)
        levels = len(channel_mult)
        block_in = channels * channel_mult[-1]
        resolution = latent_size
        self.conv_in = nn.Conv2d(in_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleDict(
            {
                "block_1": ResnetBlock(block_in, block_in, dropout),
                "attn_1": AttnBlock(block_in),
                "block_2": ResnetBlock(block_in, block_in, dropout),
            }
        )
        up: list[DecoderLevel] = []
        for level in reversed(range(levels)):
            block_out = channels * channel_mult[level]
            blocks, attns = [], []
            for _ in range(res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            upsample = None
            if level != 0:
                upsample = Upsample(block_in)
                resolution *= 2
            up.insert(0, DecoderLevel(blocks, attns, upsample))
        self.up = nn.ModuleList(up)
        self.output_size = resolution
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, tokens_map: torch.Tensor) -> torch.Tensor:
        """tokens_map (N, token_channels, h, w) -> image (N, out_channels, output_size, output_size)."""
        if tokens_map.shape[-2:] != (self.latent_size, self.latent_size):
            tokens_map = F.interpolate(tokens_map, size=(self.latent_size, self.latent_size), mode="bilinear")
        h = self.conv_in(self.post_quant(tokens_map))
        h = self.mid["block_2"](self.mid["attn_1"](self.mid["block_1"](h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

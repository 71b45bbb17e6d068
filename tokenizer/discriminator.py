"""The adversarial part of the tokenizer's reconstruction loss: the official PatchGAN-ResNet discriminator, its
hinge loss, the generator loss and the adaptive GAN weight (notes section 2.3-2.4).

- `PatchDiscriminator` (official `NLayerDiscriminator(ndf=64, n_layers=3)`): conv3x3 stride 2 (3 -> ndf) +
  LeakyReLU(0.2); `n_layers - 1` residual blocks that halve the resolution and double the width (capped at 8x);
  one stride-1 residual block; conv3x3 to one logit per patch. Each block is GN - LeakyReLU(0.2) - conv3x3 with a
  bilinear-resize + 1x1 shortcut; convs are initialised N(0, 0.02). It is not part of the saved tokenizer: the
  training loop owns it (and its Adam optimizer, official lr 7.2e-5, betas (0.5, 0.9)).
- `hinge_d_loss`: ``0.5 * (mean(h(1 - D(x))) + mean(h(1 + D(x_hat))))`` with h = leaky_relu (the official code) or
  relu. The official loop multiplies it by the GAN weight (0.75) after the first GAN epoch.
- `generator_loss`: ``-mean(D(x_hat))``.
- `adaptive_weight`: ``clamp(||grad_W nll|| / (||grad_W L_G|| + 1e-4), min, max)`` on the decoder's last layer
  W, detached (official clamp 0.3..10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32


class DiscriminatorBlock(nn.Module):
    """GN - LeakyReLU(0.2) - conv3x3(stride); the input is resized and 1x1-projected when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(NORM_GROUPS, in_channels, eps=1e-6, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        if x.shape[-2:] != h.shape[-2:]:
            x = F.interpolate(x, size=h.shape[-2:], mode="bilinear")
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class PatchDiscriminator(nn.Module):
    """PatchGAN-ResNet: image (N, 3, H, W) in [-1, 1] -> patch logits (N, 1, h, w)."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchDiscriminator.layers: expected >= 1, got {layers}")
        modules: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, layers):
            previous, mult = mult, min(2**n, 8)
            modules.append(DiscriminatorBlock(channels * previous, channels * mult, stride=2))
        previous, mult = mult, min(2**layers, 8)
        modules.append(DiscriminatorBlock(channels * previous, channels * mult, stride=1))
        modules.append(nn.Conv2d(channels * mult, 1, 3, stride=1, padding=1))
        self.main = nn.Sequential(*modules)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config) -> PatchDiscriminator:
        """Build from a `DualTokenConfig` (`disc_channels`, `disc_layers`)."""
        return cls(channels=config.disc_channels, layers=config.disc_layers)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official `weights_init`: conv weights N(0, 0.02); biases and norms keep their PyTorch defaults."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "leaky") -> torch.Tensor:
    """Discriminator hinge loss; `kind` "leaky" (official, leaky_relu) or "relu"."""
    if kind == "leaky":
        act = F.leaky_relu
    elif kind == "relu":
        act = F.relu
    else:
        raise ValueError(f"hinge_d_loss.kind: expected 'leaky' or 'relu', got {kind!r}")
    return 0.5 * (act(1.0 - logits_real).mean() + act(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The official ("vanilla") generator loss: ``-mean(D(x_hat))``."""
    return -logits_fake.mean()


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    minimum: float = 0.3,
    maximum: float = 10.0,
) -> torch.Tensor:
    """Balance the GAN term against the reconstruction term at the decoder's last layer (detached scalar)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(minimum, maximum).detach()

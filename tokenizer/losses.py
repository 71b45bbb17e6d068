"""The tokenizer's training losses (official HEAD `train.py` stage 1, notes section 2.3); every weight comes from
`DualTokenConfig`:

    L_sem  = semantic_weight * [ semantic_token_weight * (MSE(z_sem, T_l) - cos(z_sem, T_l))
                                + semantic_pool_weight * (MSE(pool, T_pool) - cos(pool, T_pool)) ]
    L_com  = commitment_weight * (commit_pixel + commit_semantic)
    L_rec  = recon_l2_weight * MSE(x_hat, x) + lpips_weight * LPIPS(x_hat, x)
    total  = L_sem + L_com + L_rec  (+ g_w * gan_weight * L_G from `generator_adversarial_loss`, once
             step >= gan_start_step)

z_sem are the post-quant semantic tokens that replace the residual stream after `semantic_layer`; T_l is the frozen
teacher's output of that same layer and T_pool its pooled (MAP-head) output; cos is taken per token on the feature
axis and averaged. The adaptive weight g_w differentiates ``nll = MSE + lpips_weight * LPIPS`` (unweighted MSE, as
the official code) and L_G through the decoder's last layer.

`LPIPS` is the VGG16 perceptual metric (taming / richzhang "lin" v0.1 layout). It only runs with weights from a
local safetensors file (`config.lpips_path`): keys ``features.{i}.weight|bias`` in torchvision's
``vgg16().features`` numbering plus ``lin{0..4}.weight`` of shape (1, C, 1, 1). With no path it is off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tokenizer.discriminator import adaptive_weight, generator_loss, hinge_d_loss

# ---------------------------------------------------------------------------------------------------- semantic


def distill_terms(student: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE over all elements, mean cosine similarity along the last axis) of student vs target."""
    student, target = student.float(), target.float()
    return F.mse_loss(student, target), F.cosine_similarity(student, target, dim=-1).mean()


def vision_tower(teacher: nn.Module) -> nn.Module:
    """The SiglipVisionModel inside `teacher` (a SiglipVisionModel, or a SiglipModel's `vision_model`)."""
    tower = getattr(teacher, "vision_model", teacher)
    for name in ("embeddings", "encoder", "post_layernorm", "head"):
        if not hasattr(tower, name):
            raise TypeError(
                f"teacher: expected a transformers SiglipVisionModel or SiglipModel with a pooling head, "
                f"{type(teacher).__name__} has no `{name}`"
            )
    return tower


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, pixels: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's output of encoder layer `layer` (1-based) and its pooled output, for pixels in [-1, 1]."""
    tower = vision_tower(teacher)
    layers = tower.encoder.layers
    if not 1 <= layer <= len(layers):
        raise ValueError(f"teacher_targets: layer {layer} is outside the teacher's 1..{len(layers)} layers")
    param = next(tower.parameters())
    hidden = tower.embeddings(pixels.to(device=param.device, dtype=param.dtype))
    tokens = hidden
    for i, block in enumerate(layers, start=1):
        hidden = block(hidden, None)
        if i == layer:
            tokens = hidden
    pooled = tower.head(tower.post_layernorm(hidden))
    return tokens, pooled


def semantic_losses(
    config: Any,
    tokens: torch.Tensor,
    pooled: torch.Tensor,
    target_tokens: torch.Tensor,
    target_pooled: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The four distillation terms and their weighted sum under "semantic"."""
    if tokens.shape != target_tokens.shape or pooled.shape != target_pooled.shape:
        raise ValueError(
            f"semantic_losses: student tokens/pooled {tuple(tokens.shape)}/{tuple(pooled.shape)} do not match the "
            f"teacher's {tuple(target_tokens.shape)}/{tuple(target_pooled.shape)} (same tower geometry needed)"
        )
    token_mse, token_cos = distill_terms(tokens, target_tokens)
    pool_mse, pool_cos = distill_terms(pooled, target_pooled)
    weighted = config.semantic_weight * (
        config.semantic_token_weight * (token_mse - token_cos)
        + config.semantic_pool_weight * (pool_mse - pool_cos)
    )
    return {
        "sem_token_mse": token_mse,
        "sem_token_cos": token_cos,
        "sem_pool_mse": pool_mse,
        "sem_pool_cos": pool_cos,
        "semantic": weighted,
    }


# ---------------------------------------------------------------------------------------------------- LPIPS

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features numbering
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """VGG16 LPIPS for images in [-1, 1]: per tap, unit-normalise channels, squared difference, 1x1 "lin" conv,
    spatial mean; summed over taps. `forward(x, y)` -> mean over the batch (scalar)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        for k, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False
        )
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        """Load the weights from a safetensors file (see the module docstring for the key layout)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS weights not found at {path} (DualTokenConfig.lpips_path); set lpips_path to None to train "
                "without the perceptual term"
            )
        model = cls()
        state = load_file(str(path))
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"LPIPS weights {path}: missing keys {missing[:6]}, unexpected keys {unexpected[:6]}; expected "
                "features.{i}.weight/bias (torchvision vgg16().features numbering) and lin0..lin4.weight"
            )
        model.load_state_dict(state)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, dropout-free

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
            if i == LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((fx - fy) ** 2).mean()
        return total


def load_perceptual(config: Any) -> LPIPS | None:
    """The LPIPS module named by `config.lpips_path`, or None when the path is unset (the term is then off)."""
    if not config.lpips_path or not config.lpips_weight:
        return None
    return LPIPS.from_file(config.lpips_path)


# ---------------------------------------------------------------------------------------------------- recon + GAN


def reconstruction_losses(
    config: Any, reconstruction: torch.Tensor, pixels: torch.Tensor, perceptual: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """recon_l2, recon_lpips (when `perceptual` is given), the weighted "reconstruction" and the GAN "nll"."""
    l2 = F.mse_loss(reconstruction.float(), pixels.float())
    out = {"recon_l2": l2}
    nll = l2
    weighted = config.recon_l2_weight * l2
    if perceptual is not None:
        lpips = perceptual(reconstruction.float(), pixels.float())
        out["recon_lpips"] = lpips
        nll = nll + config.lpips_weight * lpips
        weighted = weighted + config.lpips_weight * lpips
    out["reconstruction"] = weighted
    out["nll"] = nll
    return out


def gan_active(config: Any, step: int) -> bool:
    """Whether the adversarial terms run at training step `step`."""
    return config.gan_weight > 0 and step >= config.gan_start_step


def generator_adversarial_loss(
    config: Any, output: Any, discriminator: nn.Module, step: int
) -> dict[str, torch.Tensor]:
    """The generator's GAN term for a `DualTokenOutput`: {"gan": g_w * gan_weight * L_G, "gen_loss": L_G,
    "gan_adaptive_weight": g_w}; zeros before `gan_start_step` or with gan_weight 0. Add "gan" to `output.loss`."""
    zero = output.reconstruction.new_zeros((), dtype=torch.float32)
    if not gan_active(config, step):
        return {"gan": zero, "gen_loss": zero, "gan_adaptive_weight": zero}
    g_loss = generator_loss(discriminator(output.reconstruction))
    weight = adaptive_weight(
        output.losses["nll"],
        g_loss,
        output.last_layer,
        minimum=config.adaptive_weight_min,
        maximum=config.adaptive_weight_max,
    )
    return {
        "gan": weight * config.gan_weight * g_loss,
        "gen_loss": g_loss.detach(),
        "gan_adaptive_weight": weight,
    }


def discriminator_loss(
    config: Any, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Hinge loss of the discriminator on detached real / reconstructed images, times `scale` (the official loop
    uses 1 in the first GAN epoch and gan_weight afterwards)."""
    dtype = next(discriminator.parameters()).dtype  # reconstructions may come out of a bf16 autocast region
    logits_real = discriminator(real.detach().to(dtype))
    logits_fake = discriminator(fake.detach().to(dtype))
    return scale * hinge_d_loss(logits_real, logits_fake, config.disc_hinge)

"""Named tokenizer presets: `tiny` (CPU, shapes world) and `paper` (SigLIP2-SO400M/14-384 geometry, official HEAD
settings), as `DualTokenConfig` field dicts and as built `DualTokenModel`s.

    tiny : 64 px, patch 8 -> 8x8 grid; 6 layers, width 192, 3 heads, MLP 768 (the tiny teacher's tower); pixel tap
           = the patch embedding (layer 0), no shortcut, pre-quant projection without attention, so every pixel
           code depends on its own 8x8 patch only (see below); semantic tap = second-to-last layer (5); RQ depth 4,
           K 1024, dim 32; decoder 8 -> 64 px (x8: ch 32, mult 1,2,2,4, 1 res block, attention at 8, 128 input
           channels); PatchGAN 32 wide; LPIPS off (no weights on CPU machines); GAN from step 400.
    paper: 384 px, patch 14 -> 27x27; SO400M tower (27 layers, width 1152, 16 heads, MLP 4304); taps 6 / 4 (x0.6) /
           26; RQ depth 8, K 16384, dim 32; latent 27 -> 24, decoder ch 128, mult 1,1,4,4,8, 2 res blocks, attention
           at 24, 1024 input channels, x16 to 384 px; PatchGAN 64 wide, 3 layers; GAN from step 19531 (half of the
           first 10M-sample epoch at batch 256); LPIPS when `lpips_path` is given.

With `backbone_dir` the tower's configuration and weights come from that local SiglipVisionModel / SiglipModel
directory (the tiny teacher, or a downloaded siglip2-so400m-patch14-384); the preset supplies everything else.

Why the tiny pixel tap is patch-local: with the paper's kind of tap (layer 2 + 0.6 x layer 1, attention projection)
a code depends on the whole scene (pixel code entropy given a cell's place and content 1.68 / 4.79 / 5.04 / 4.88
nats at depths 0-3 on the shapes world), so a generator has to model the joint of 64 x 4 codes; tapped per patch the
same entropies are 0.05 / 0.30 / 0.43 / 0.45 nats, and PSNR, FD and zero-shot come out better at the same budget
(README "Text-to-image: the ladder"). `pixel_layer=2, shortcut_layer=1, pixel_projection_attention=True` restore
the earlier tap.

Overrides are `DualTokenConfig` fields; `image_size` / `patch_size` / `vision_config` (a dict merged into the
preset's) also reshape the tower when no `backbone_dir` is given.
"""

from __future__ import annotations

import os
from typing import Any

from tokenizer.configuration import DualTokenConfig, load_vision_config
from tokenizer.modeling import DualTokenModel

PRESETS = ("tiny", "paper")

TINY_VISION = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "image_size": 64,
    "patch_size": 8,
}

PAPER_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}


def tiny_fields(num_layers: int = TINY_VISION["num_hidden_layers"]) -> dict[str, Any]:
    """Tiny preset fields; the semantic tap is the second-to-last of `num_layers`."""
    return {
        "vision_config": dict(TINY_VISION),
        "pixel_layer": 0,
        "shortcut_layer": None,
        "shortcut_weight": 0.6,
        "pixel_projection_attention": False,
        "semantic_layer": num_layers - 1,
        "codebook_size": 1024,
        "code_dim": 32,
        "rq_depth": 4,
        "decoder_channels": 32,
        "decoder_channel_mult": [1, 2, 2, 4],
        "decoder_res_blocks": 1,
        "decoder_attn_resolutions": [8],
        "decoder_in_channels": 128,
        "decoder_latent_size": None,
        "disc_channels": 32,
        "disc_layers": 3,
        "lpips_path": None,
        "gan_start_step": 400,
    }


def paper_fields() -> dict[str, Any]:
    """Paper preset fields (official `model_config_siglip_384_rvq8` + stage-1 loss weights)."""
    return {
        "vision_config": dict(PAPER_VISION),
        "pixel_layer": 6,
        "shortcut_layer": 4,
        "shortcut_weight": 0.6,
        "semantic_layer": 26,
        "codebook_size": 16384,
        "code_dim": 32,
        "rq_depth": 8,
        "decoder_channels": 128,
        "decoder_channel_mult": [1, 1, 4, 4, 8],
        "decoder_res_blocks": 2,
        "decoder_attn_resolutions": [24],
        "decoder_in_channels": 1024,
        "decoder_latent_size": 24,
        "disc_channels": 64,
        "disc_layers": 3,
        "lpips_path": None,
        "gan_start_step": 19531,
    }


def preset_fields(
    preset: str, backbone_dir: str | os.PathLike | None = None, **overrides: Any
) -> dict[str, Any]:
    """The `DualTokenConfig` fields of `preset` with `overrides` applied (see the module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; expected one of {PRESETS}")
    num_layers = None
    if backbone_dir is not None:
        num_layers = load_vision_config(backbone_dir).num_hidden_layers
    if preset == "tiny":
        fields = tiny_fields(num_layers or TINY_VISION["num_hidden_layers"])
    else:
        fields = paper_fields()
    vision = dict(fields.pop("vision_config"))
    vision.update(overrides.pop("vision_config", None) or {})
    for name in ("image_size", "patch_size"):
        if name in overrides and backbone_dir is None:
            vision[name] = overrides[name]
    fields.update(overrides)
    if backbone_dir is None:
        fields["vision_config"] = vision
    return fields


def tokenizer_config(preset: str, **overrides: Any) -> DualTokenConfig:
    """The `DualTokenConfig` of a preset with a randomly initialised tower of the preset's geometry."""
    return DualTokenConfig(**preset_fields(preset, **overrides))


def build_tokenizer(
    preset: str, backbone_dir: str | os.PathLike | None = None, **overrides: Any
) -> DualTokenModel:
    """A new `DualTokenModel` of `preset`: the tower from `backbone_dir` when given (weights copied), random
    otherwise; projections, quantizers and decoder freshly initialised."""
    fields = preset_fields(preset, backbone_dir, **overrides)
    if backbone_dir is not None:
        return DualTokenModel.from_pretrained_backbone(backbone_dir, **fields)
    return DualTokenModel(DualTokenConfig(**fields))

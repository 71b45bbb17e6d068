"""`DualTokenConfig`: the configuration of the DualToken tokenizer (`tokenizer.modeling.DualTokenModel`).

It nests the SigLIP vision tower's configuration (`vision_config`, a `SiglipVisionConfig`) and records the layer
taps, the two residual quantizers, the pixel decoder, the discriminator and every loss weight. Defaults are the
paper's (official HEAD code, `model_config_siglip_384_rvq8`, `train.py` stage 1; see
shared/reference/dualtoken-notes.md sections 2.1-2.4); `tokenizer.presets` holds the tiny and paper presets.

Layer indices are 1-based and name the *output* of that encoder layer (HF `hidden_states[k]`); `pixel_layer` may
also be 0, the patch embedding (the tiny preset's patch-local pixel tap). The semantic branch replaces the residual
stream after `semantic_layer` with its quantized, re-projected tokens, which then run through the remaining layers,
the post-layernorm and the pooling head.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PretrainedConfig, SiglipVisionConfig

EMA_UPDATE_MODES = ("per_depth", "after_depths")
HINGE_KINDS = ("leaky", "relu")
NORM_GROUPS = 32  # GroupNorm groups in the decoder / discriminator (taming convention)


def load_vision_config(source: str | os.PathLike) -> SiglipVisionConfig:
    """The `SiglipVisionConfig` of a local SiglipVisionModel or SiglipModel directory (`config.json`)."""
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"DualTokenConfig.vision_config: {path} is not a local model directory with a config.json "
            "(expected a saved SiglipVisionModel or SiglipModel)"
        )
    return SiglipVisionConfig.from_pretrained(path)


class DualTokenConfig(PretrainedConfig):
    """Configuration of `DualTokenModel`.

    Fields:
        vision_config: the SigLIP vision tower (a `SiglipVisionConfig`, its dict, or the path of a local
            SiglipVisionModel / SiglipModel directory whose config is read). Needs the pooling head.
        image_size / patch_size: must agree with `vision_config` (None takes them from it); grid = image // patch.
        pixel_layer: the encoder layer whose output feeds the pixel branch (paper 6); 0 taps the patch
            embedding itself, so that (with `pixel_projection_attention` off and no shortcut) every pixel code is a
            function of its own patch only.
        shortcut_layer / shortcut_weight: an earlier layer whose projected output is added to the pixel latent
            with this weight (paper 4 and 0.6); None disables the shortcut.
        pixel_projection_attention: the pixel pre-quant projection attends across the grid (the official
            `AttnProjection`, True); False keeps its linear and MLP paths only, so it maps each token on its own.
        semantic_layer: the layer whose output feeds the semantic branch (paper 26 of 27).
        codebook_size / code_dim / rq_depth: K, the code width and D of both residual quantizers.
        shared_codebook: one codebook for every depth of a branch (the paper's setting; the only one supported).
        ema_decay / ema_eps: EMA codebook decay and Laplace smoothing.
        restart_dead_codes / dead_code_threshold: codes whose EMA count falls below the threshold are replaced by
            vectors of the current batch at every update.
        pixel_ema_update / semantic_ema_update: "per_depth" updates the shared codebook inside every depth step
            (official `rq`, used for pixels); "after_depths" does one update with the residuals of all depths
            after the loop (official `rq_ema`, used for semantics).
        projection_mlp_ratio: hidden width of the projections' GeGLU MLP as a multiple of their output width.
        decoder_channels / decoder_channel_mult / decoder_res_blocks / decoder_attn_resolutions /
            decoder_in_channels / decoder_dropout: the taming-style conv decoder (each level has res_blocks + 1
            residual blocks; attention at the listed latent resolutions).
        decoder_latent_size: the pixel latent grid is resized (bilinear) to this size before decoding (paper
            27 -> 24); None keeps the grid size. latent * 2 ** (len(mult) - 1) must equal image_size.
        disc_channels / disc_layers / disc_hinge: PatchGAN-ResNet discriminator width, depth and hinge flavour
            ("leaky" is the official leaky_relu hinge, "relu" the textbook one).
        semantic_weight / semantic_token_weight / semantic_pool_weight: L_sem = semantic_weight *
            (token_weight * (MSE - cos) on the deep tokens + pool_weight * (MSE - cos) on the pooled output).
        commitment_weight: weight of (commitment_pixel + commitment_semantic).
        recon_l2_weight / lpips_weight: L_rec = l2_weight * MSE + lpips_weight * LPIPS.
        lpips_path: a local safetensors file with VGG16 + LPIPS weights (`tokenizer.losses.LPIPS`); None = off.
        gan_weight / gan_start_step: weight of the adaptive-weighted generator loss and the step it starts at.
        adaptive_weight_min / adaptive_weight_max: clamp of the adaptive GAN weight (official 0.3, 10).
    """

    model_type = "dualtoken"
    sub_configs_defaults = {"vision_config": SiglipVisionConfig}

    vision_config: dict | PretrainedConfig | str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    pixel_layer: int = 6
    shortcut_layer: int | None = 4
    shortcut_weight: float = 0.6
    pixel_projection_attention: bool = True
    semantic_layer: int = 26
    codebook_size: int = 16384
    code_dim: int = 32
    rq_depth: int = 8
    shared_codebook: bool = True
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_dead_codes: bool = True
    dead_code_threshold: float = 1.0
    pixel_ema_update: str = "per_depth"
    semantic_ema_update: str = "after_depths"
    projection_mlp_ratio: float = 2.0
    decoder_channels: int = 128
    decoder_channel_mult: list[int] | tuple[int, ...] = (1, 1, 4, 4, 8)
    decoder_res_blocks: int = 2
    decoder_attn_resolutions: list[int] | tuple[int, ...] = (24,)
    decoder_in_channels: int = 1024
    decoder_latent_size: int | None = 24
    decoder_dropout: float = 0.0
    disc_channels: int = 64
    disc_layers: int = 3
    disc_hinge: str = "leaky"
    semantic_weight: float = 1.0
    semantic_token_weight: float = 5.0
    semantic_pool_weight: float = 1.0
    commitment_weight: float = 5.0
    recon_l2_weight: float = 5.0
    lpips_weight: float = 1.0
    lpips_path: str | None = None
    gan_weight: float = 0.75
    gan_start_step: int = 19531
    adaptive_weight_min: float = 0.3
    adaptive_weight_max: float = 10.0

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, (str, os.PathLike)):
            self.vision_config = load_vision_config(self.vision_config)
        super().__post_init__(**kwargs)
        self.decoder_channel_mult = [int(m) for m in self.decoder_channel_mult]
        self.decoder_attn_resolutions = [int(r) for r in self.decoder_attn_resolutions]
        vision = self.vision_config
        for name in ("image_size", "patch_size"):
            ours, theirs = getattr(self, name), getattr(vision, name)
            if not isinstance(theirs, int):
                raise ValueError(
                    f"DualTokenConfig.vision_config.{name}: expected one integer, got {theirs!r}"
                )
            if ours is None:
                setattr(self, name, theirs)
            elif ours != theirs:
                raise ValueError(
                    f"DualTokenConfig.{name}={ours} disagrees with vision_config.{name}={theirs}; "
                    "change both (tokenizer.presets does) or leave this field unset"
                )
        self._validate()

    # ------------------------------------------------------------------ derived geometry
    @property
    def hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.vision_config.num_hidden_layers)

    @property
    def grid_size(self) -> int:
        """Patches per side: the patch conv has no padding, so 384 px / patch 14 gives 27."""
        return self.image_size // self.patch_size

    @property
    def latent_size(self) -> int:
        """Spatial size of the decoder's input latent."""
        return self.decoder_latent_size or self.grid_size

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def positive_int(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DualTokenConfig.{name}: expected a positive integer, got {value!r}")
            return value

        for name in (
            "image_size",
            "patch_size",
            "semantic_layer",
            "codebook_size",
            "code_dim",
            "rq_depth",
            "decoder_channels",
            "decoder_res_blocks",
            "decoder_in_channels",
            "disc_channels",
            "disc_layers",
        ):
            positive_int(name)
        if self.patch_size > self.image_size:
            raise ValueError(
                f"DualTokenConfig.patch_size {self.patch_size} is larger than image_size {self.image_size}"
            )
        if not self.vision_config.vision_use_head:
            raise ValueError("DualTokenConfig.vision_config.vision_use_head must be True (the pooled output)")
        if not self.semantic_layer <= self.num_layers:
            raise ValueError(
                f"DualTokenConfig.semantic_layer={self.semantic_layer} exceeds the tower's {self.num_layers} layers"
            )
        if (
            isinstance(self.pixel_layer, bool)
            or not isinstance(self.pixel_layer, int)
            or self.pixel_layer < 0
        ):
            raise ValueError(
                f"DualTokenConfig.pixel_layer: expected an integer >= 0 (0 = the patch embedding), got "
                f"{self.pixel_layer!r}"
            )
        if not isinstance(self.pixel_projection_attention, bool):
            raise ValueError(
                "DualTokenConfig.pixel_projection_attention: expected true or false, got "
                f"{self.pixel_projection_attention!r}"
            )
        if not self.pixel_layer <= self.semantic_layer:
            raise ValueError(
                f"DualTokenConfig.pixel_layer={self.pixel_layer} must be <= semantic_layer={self.semantic_layer}"
            )
        if self.shortcut_layer is not None:
            positive_int("shortcut_layer")
            if self.shortcut_layer > self.semantic_layer:
                raise ValueError(
                    f"DualTokenConfig.shortcut_layer={self.shortcut_layer} must be <= semantic_layer="
                    f"{self.semantic_layer}"
                )
        hidden = self.hidden_size
        if hidden % self.code_dim:
            raise ValueError(
                f"DualTokenConfig.code_dim={self.code_dim} must divide vision_config.hidden_size={hidden} "
                "(the attention projections use hidden_size / code_dim heads of width code_dim)"
            )
        if not self.shared_codebook:
            raise ValueError(
                "DualTokenConfig.shared_codebook: only True is supported (the paper's setting; the MLLM embeds "
                "codes through one (K, code_dim) table per branch)"
            )
        for name in ("pixel_ema_update", "semantic_ema_update"):
            if getattr(self, name) not in EMA_UPDATE_MODES:
                raise ValueError(
                    f"DualTokenConfig.{name}: expected one of {EMA_UPDATE_MODES}, got {getattr(self, name)!r}"
                )
        if self.disc_hinge not in HINGE_KINDS:
            raise ValueError(
                f"DualTokenConfig.disc_hinge: expected one of {HINGE_KINDS}, got {self.disc_hinge!r}"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"DualTokenConfig.ema_decay: expected a value in (0, 1), got {self.ema_decay!r}")
        if not self.decoder_channel_mult or any(m < 1 for m in self.decoder_channel_mult):
            raise ValueError(
                f"DualTokenConfig.decoder_channel_mult: expected positive integers, got {self.decoder_channel_mult}"
            )
        if self.decoder_latent_size is not None:
            positive_int("decoder_latent_size")
        resolution = self.latent_size * 2 ** (len(self.decoder_channel_mult) - 1)
        if resolution != self.image_size:
            raise ValueError(
                f"DualTokenConfig: the decoder maps a {self.latent_size}x{self.latent_size} latent to {resolution} px "
                f"({len(self.decoder_channel_mult) - 1} x2 upsamplings), but image_size is {self.image_size}; "
                "adjust decoder_latent_size or decoder_channel_mult"
            )
        channels = [self.decoder_in_channels, hidden]
        channels += [self.decoder_channels * m for m in self.decoder_channel_mult]
        channels += [self.disc_channels * min(2**n, 8) for n in range(self.disc_layers + 1)]
        if any(c % NORM_GROUPS for c in channels):
            raise ValueError(
                f"DualTokenConfig: decoder_in_channels, vision hidden_size, decoder_channels * each mult and "
                f"disc_channels * 2^n must be multiples of {NORM_GROUPS} (GroupNorm groups), got {channels}"
            )
        if self.gan_start_step < 0:
            raise ValueError(f"DualTokenConfig.gan_start_step: expected >= 0, got {self.gan_start_step!r}")
        if not 0 < self.adaptive_weight_min <= self.adaptive_weight_max:
            raise ValueError(
                "DualTokenConfig.adaptive_weight_min/max: expected 0 < min <= max, got "
                f"{self.adaptive_weight_min!r}, {self.adaptive_weight_max!r}"
            )
        for name in (
            "shortcut_weight",
            "semantic_weight",
            "semantic_token_weight",
            "semantic_pool_weight",
            "commitment_weight",
            "recon_l2_weight",
            "lpips_weight",
            "gan_weight",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"DualTokenConfig.{name}: expected a non-negative number, got {value!r}")

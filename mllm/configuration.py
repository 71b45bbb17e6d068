"""`DualTokenMLLMConfig`: the configuration of the unified DualToken multimodal LLM.

It nests the configuration of the wrapped causal LM (`text_config`, any `AutoConfig` model type; Qwen2 is the
default) and records the visual-code geometry of the DualToken tokenizer, the depth-head sizes, the special
token ids and the exchange-format layout.

Design decisions recorded here (they are the contract between the processor, the model and the generators):

- **One sequence position per image grid cell.** Every cell of an image is one `<img>` token in `input_ids`; its
  input embedding is built from the cell's codes, never from the `<img>` embedding row.
- **Output images** (those the assistant produces, `image_is_output=True`) are always embedded as
  ``[MLP_pix(sum_d E_pix[c_d]) ; MLP_sem(sum_d E_sem[c_d])]`` (two 2-layer MLPs, each `hidden_size // 2` wide,
  concatenated along the width). With `use_semantic_head=False` (the "pixel head only" ablation) the semantic half
  is zeros, because the model never predicts semantic codes for its own images.
- **Understanding inputs** follow `understanding_tokens`:
  ``"semantic"`` (default) feeds ``MLP_und(sum_d E_sem[c_d])``, a separate 2-layer MLP to the *full* LLM width, so
  the whole width carries the semantic signal as in LLaVA-style projectors (zeros in a pixel half would leave half
  the input width constant); ``"semantic+pixel"`` feeds the same ``[MLP_pix ; MLP_sem]`` concatenation as output
  images.
- **Exchange vocabulary**: ``[text vocabulary incl. specials | K pixel ids | K semantic ids]``. The pixel id of
  code ``c`` is ``visual_token_offset + c`` and its semantic id ``visual_token_offset + K + c``, where
  `visual_token_offset` is the number of rows of the LLM embedding table (which is >= the text tokenizer
  length). The 2K code ids get **no** LLM embedding or lm_head rows: the range is reserved for serialisation
  (`mllm.sequence.serialize`) while the model consumes codes through the frozen code embeddings.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

UNDERSTANDING_TOKENS = ("semantic", "semantic+pixel")


class DualTokenMLLMConfig(PretrainedConfig):
    """Configuration of `DualTokenMLLM`.

    Fields:
        text_config: the wrapped causal LM's configuration (dict with a `model_type`, or a config object).
        codebook_size / code_dim / rq_depth: K, the code embedding width and D of both DualToken branches.
        grid_size / image_size: the h (= w) of a code grid and the pixel size of decoded images.
        understanding_tokens: "semantic" or "semantic+pixel" (see the module docstring).
        use_semantic_head: False builds the "pixel head only" ablation (no semantic head, semantic half zeros).
        input_cell_norm: subtract each input image's mean cell embedding from its cells, then LayerNorm them.
            Without it, training drives the projector toward one large vector shared by every cell (the
            background dominates; measured cosine 0.995 between cells), the cells' keys become indistinguishable
            and the LLM answers from the question alone (oracle cell codes: loss with the real and a shuffled
            image equal to 1e-3 after 600 steps; with it, apart from step 100). Output images are not centred
            (their later cells are not known while drawing).
        image_position_embedding: add a learned embedding per grid cell (h*w x hidden, 2-D sine-cosine at init,
            `cell_embedding.grid_sincos`) to input-image cells, so the LLM sees where a cell is without counting raster
            positions through RoPE.
        image_position_regions: k > 0 adds to the start of that embedding one random vector (rms 0.5) per cell of a
            k x k partition of the image, shared by the grid cells whose centre lies in it
            (`cell_embedding.region_vectors`), so cells of one coarse place start alike; 0 (the default) adds none.
        output_position_embedding: the same for output-image cells (its own table): the state that predicts cell
            i+1 reads that it sits at cell i from its input instead of counting from `<boi>` through RoPE, which a
            prompt of varying length makes harder.
        output_semantic_dropout: in training, zero the semantic half of an output image's cell embeddings with this
            probability (one draw per image); 1 zeroes it always, in decoding too, so the semantic codes are
            predicted but never fed back. The semantic codes come from a deep layer that attends over the whole
            image, so the first (background) cells' codes already tell what the scene holds; teacher-forced, the
            model can draw from them instead of the caption.
        llm_query_key_init_std: when the LLM is built from a config (random weights), draw its attention query and
            key projections (`q_proj` / `k_proj`) at this std instead of the LLM's `initializer_range`; None keeps
            it. Ignored for pretrained LLMs. With the rest at 0.1 (the tiny preset), 0.02 here keeps the generation
            calibration's pace but read 5 points less VQA at the long budget, so the preset leaves it unset
            (README "The LLM's starting scale").
        depth_head_layers / depth_head_width / depth_head_heads: depth-transformer size (width and heads default
            to the LLM hidden size and head count); depth_head_mlp_ratio and depth_head_dropout as in a GPT block.
        projector_act: activation inside the 2-layer code MLPs.
        pixel_loss_weight / semantic_loss_weight: weights of the two visual CE terms (text CE has weight 1).
        image_token_id: the "<image>" placeholder users write (expanded by the processor, never fed).
        img_token_id / boi_token_id / eoi_token_id: the per-cell input id and the image delimiters.
        pad_token_id / eos_token_id / turn_end_token_id: padding, end of text and end of an assistant turn.
        visual_token_offset: first exchange id of the visual range (see the module docstring).
        image_tokenizer_path: where the DualToken tokenizer lives, relative to the checkpoint directory or absolute.
    """

    model_type = "dualtoken_mllm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PretrainedConfig | None = None
    codebook_size: int = 1024
    code_dim: int = 32
    rq_depth: int = 4
    grid_size: int = 8
    image_size: int = 64
    understanding_tokens: Literal["semantic", "semantic+pixel"] = "semantic"
    use_semantic_head: bool = True
    input_cell_norm: bool = False
    image_position_embedding: bool = False
    image_position_regions: int = 0
    output_position_embedding: bool = False
    llm_query_key_init_std: float | None = None
    output_semantic_dropout: float = 0.0
    depth_head_layers: int = 3
    depth_head_width: int | None = None
    depth_head_heads: int | None = None
    depth_head_mlp_ratio: float = 4.0
    depth_head_dropout: float = 0.0
    projector_act: str = "gelu"
    pixel_loss_weight: float = 1.0
    semantic_loss_weight: float = 1.0
    image_token_id: int | None = None
    img_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    turn_end_token_id: int | None = None
    visual_token_offset: int | None = None
    image_tokenizer_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.understanding_tokens not in UNDERSTANDING_TOKENS:
            raise ValueError(
                f"DualTokenMLLMConfig.understanding_tokens must be one of {UNDERSTANDING_TOKENS}, "
                f"got {self.understanding_tokens!r}"
            )
        for name in ("codebook_size", "code_dim", "rq_depth", "grid_size", "image_size", "depth_head_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DualTokenMLLMConfig.{name} must be a positive integer, got {value!r}")
        regions = self.image_position_regions
        if isinstance(regions, bool) or not isinstance(regions, int) or not 0 <= regions <= self.grid_size:
            raise ValueError(
                f"DualTokenMLLMConfig.image_position_regions must be an integer in [0, grid_size={self.grid_size}],"
                f" got {regions!r}"
            )
        if regions and not self.image_position_embedding:
            raise ValueError("DualTokenMLLMConfig.image_position_regions needs image_position_embedding=True")
        drop = self.output_semantic_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop <= 1.0:
            raise ValueError(f"DualTokenMLLMConfig.output_semantic_dropout must lie in [0, 1], got {drop!r}")
        std = self.llm_query_key_init_std
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
            raise ValueError(
                f"DualTokenMLLMConfig.llm_query_key_init_std must be a positive number or None, got {std!r}"
            )
        hidden = self.text_config.hidden_size
        if hidden % 2:
            raise ValueError(
                f"DualTokenMLLMConfig.text_config.hidden_size must be even (two half-width code MLPs), got {hidden}"
            )
        width, heads = self.head_width, self.head_heads
        if width % heads:
            raise ValueError(
                f"DualTokenMLLMConfig: depth_head_width {width} is not divisible by depth_head_heads {heads}"
            )
        # The LLM decides whether its own lm_head is tied; the wrapper never ties anything itself.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def head_width(self) -> int:
        """Width of each depth transformer (defaults to the LLM hidden size)."""
        return self.depth_head_width or self.text_config.hidden_size

    @property
    def head_heads(self) -> int:
        """Attention heads of each depth transformer (defaults to the LLM head count)."""
        return self.depth_head_heads or self.text_config.num_attention_heads

    @property
    def num_image_positions(self) -> int:
        """Sequence positions per image: one per grid cell."""
        return self.grid_size * self.grid_size

    def pixel_exchange_id(self, code: int) -> int:
        return self._offset() + code

    def semantic_exchange_id(self, code: int) -> int:
        return self._offset() + self.codebook_size + code

    def _offset(self) -> int:
        if self.visual_token_offset is None:
            raise ValueError(
                "DualTokenMLLMConfig.visual_token_offset is unset; build the model with a text tokenizer"
            )
        return self.visual_token_offset

    def require_special_ids(self) -> None:
        """Raise a clear error when the special token ids needed for multimodal sequences are missing."""
        missing = [
            name
            for name in (
                "img_token_id",
                "boi_token_id",
                "eoi_token_id",
                "pad_token_id",
                "visual_token_offset",
            )
            if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"DualTokenMLLMConfig is missing {missing}; build the model with DualTokenMLLM.from_llm(...) or "
                "set the ids from the processor (DualTokenMLLM.set_special_tokens)"
            )

"""Named MLLM configurations: `tiny` (a small Qwen2 that trains on CPU in minutes) and `paper`
(Qwen2.5-3B-Instruct from a local directory with the paper-scale DualToken geometry)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from mllm.configuration import DualTokenMLLMConfig

PRESETS = ("tiny", "paper")


def tiny_text_config(vocab_size: int = 1024, **overrides: Any) -> dict:
    """A 4-layer, 256-wide Qwen2 (about 3M parameters besides the embeddings), weights at std 0.1; embeddings are
    resized later."""
    config = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        # Weights drawn at std 0.1, not HF's 0.02: a question's lookup across the image cells forms far sooner
        # (long budget test VQA 71.5% against 59.8%; the lookup calibration with one token between question and
        # answer 73 against 52%; README "The LLM's starting scale").
        "initializer_range": 0.1,
    }
    config.update(overrides)
    return config


def tiny_fields(**overrides: Any) -> dict[str, Any]:
    """Tiny preset fields: the tiny Qwen2 above, 3-layer depth heads 128 wide (half the LLM width, as the paper
    preset's 1,024-wide heads are half of Qwen2.5-3B's 2,048), the tiny tokenizer geometry (64 px, 8x8 grid,
    depth 4; the code sizes are overwritten from the tokenizer by `from_tokenizer`), centred + normalised input
    cells with a 2-D position embedding that starts with the 3x3 object layout's places."""
    fields: dict[str, Any] = {
        "text_config": tiny_text_config(),
        "codebook_size": 1024,
        "code_dim": 32,
        "rq_depth": 4,
        "grid_size": 8,
        "image_size": 64,
        "depth_head_layers": 3,
        "depth_head_width": 128,
        "depth_head_heads": 4,
        # Input cells centred on their image's mean and layer-normalised, plus a 2-D position embedding: without
        # them the from-scratch LLM answers from the question alone (bench/vqa_ladder.py, README "Understanding").
        "input_cell_norm": True,
        "image_position_embedding": True,
        # That embedding starts with one vector per cell of the 3x3 object layout on top of its sine-cosine table, so
        # the cells of one place start alike: position questions 46-55% against 12.5% at the default budget in two
        # same-tokenizer pairs, VQA +1.6 / +3.5 (README "Coarse places for the input cells").
        "image_position_regions": 3,
        # Output cells too: with it the state that predicts a cell knows which cell it is at without counting from
        # <boi> (bench/t2i_ladder.py, README "Text-to-image: the ladder").
        "output_position_embedding": True,
        # No `llm_query_key_init_std`: the query and key projections start at 0.1 with the rest. Keeping them at
        # 0.02 keeps the generation calibration's pace (36.5% of grids exact at step 250 against 6.5%), but the
        # long budget read 66.2% test VQA with it against 71.5% without, and the demo's generator stayed
        # caption-blind either way (README "The LLM's starting scale").
        # No `output_semantic_dropout` yet: never feeding the semantic codes back makes the caption move the
        # generation ladder's losses and speeds the demo's pixel head, but the default budget has too few
        # text-to-image examples to show it in T2I (README "The semantic codes hand the scene to the generator").
    }
    fields.update(overrides)
    return fields


def tiny_mllm_config(**overrides: Any) -> DualTokenMLLMConfig:
    """The tiny preset configuration (see `tiny_fields`)."""
    return DualTokenMLLMConfig(**tiny_fields(**overrides))


def paper_fields(llm_dir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Paper preset fields: the text config of a local Qwen2.5-3B-Instruct directory, K=16,384 codes of dim 32, depth 8,
    27x27 grid at 384 px, 3-layer depth heads 1,024 wide with 16 heads (8 per-depth classifiers each)."""
    path = Path(llm_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"paper_mllm_config: no config.json in the LLM directory {path}")
    fields: dict[str, Any] = {
        "text_config": AutoConfig.from_pretrained(path),
        "codebook_size": 16384,
        "code_dim": 32,
        "rq_depth": 8,
        "grid_size": 27,
        "image_size": 384,
        "depth_head_layers": 3,
        "depth_head_width": 1024,
        "depth_head_heads": 16,
    }
    fields.update(overrides)
    return fields


def paper_mllm_config(llm_dir: str | os.PathLike, **overrides: Any) -> DualTokenMLLMConfig:
    """The paper preset configuration (see `paper_fields`)."""
    return DualTokenMLLMConfig(**paper_fields(llm_dir, **overrides))


def mllm_config(
    preset: str, llm_dir: str | os.PathLike | None = None, **overrides: Any
) -> DualTokenMLLMConfig:
    """Configuration of a named preset ("tiny" or "paper"; "paper" needs `llm_dir`)."""
    if preset == "tiny":
        return tiny_mllm_config(**overrides)
    if preset == "paper":
        if llm_dir is None:
            raise ValueError("the 'paper' MLLM preset needs llm_dir (a local Qwen2.5-3B-Instruct directory)")
        return paper_mllm_config(llm_dir, **overrides)
    raise ValueError(f"unknown MLLM preset {preset!r}; expected one of {PRESETS}")


def build(
    preset: str,
    text_tokenizer: Any,
    image_tokenizer: Any | None = None,
    llm_dir: str | os.PathLike | None = None,
    **overrides: Any,
):
    """(DualTokenMLLM, DualTokenProcessor) of a preset, by the one construction path: the processor first (its
    text tokenizer gets the special tokens it lacks, there and only there), then the model from it. "tiny" builds a
    randomly initialised tiny Qwen2 sized to the processor's vocabulary; "paper" loads the pretrained LLM weights
    from `llm_dir`. The code geometry and embeddings come from `image_tokenizer` when given (otherwise the
    preset's geometry, and the caller sets the code embeddings)."""
    from mllm.modeling import DualTokenMLLM
    from mllm.processor import DualTokenProcessor

    if preset == "tiny":
        fields = tiny_fields(**overrides)
    elif preset == "paper":
        if llm_dir is None:
            raise ValueError("the 'paper' MLLM preset needs llm_dir (a local Qwen2.5-3B-Instruct directory)")
        fields = paper_fields(llm_dir, **overrides)
    else:
        raise ValueError(f"unknown MLLM preset {preset!r}; expected one of {PRESETS}")
    text_config = fields.pop("text_config")
    geometry = (
        {}
        if image_tokenizer is not None
        else {"grid_size": fields["grid_size"], "rq_depth": fields["rq_depth"]}
    )
    processor = DualTokenProcessor(text_tokenizer, image_tokenizer, **geometry)
    llm = llm_dir if preset == "paper" else {**text_config, "vocab_size": len(processor.tokenizer)}
    return DualTokenMLLM.from_llm(llm, processor, **fields), processor

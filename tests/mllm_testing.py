"""Shared builders for the MLLM tests: a tiny SentencePiece text tokenizer, a micro model and processor, and
random code grids. The DualToken tiny tokenizer is used where decode/encode of real images is exercised."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from mllm.modeling import DualTokenMLLM
from mllm.presets import tiny_fields
from mllm.processor import DualTokenProcessor

CORPUS = [
    "a red circle on the left",
    "what color is the square",
    "two blue triangles at the top",
    "the answer is green",
    "describe the image please",
    "how many shapes are there",
    "there are three shapes",
    "a yellow star in the middle",
    "draw a purple square",
]

MICRO = {"codebook_size": 64, "code_dim": 8, "rq_depth": 4, "grid_size": 3}

# The micro models are far too small to gain from intra-op threads; on a shared 2-core machine a second thread
# mostly waits at barriers (decoding loops ran 10-20x slower with 2 threads under load).
torch.set_num_threads(1)


def train_text_tokenizer(directory: Path):
    """Train a ~120-piece SentencePiece BPE model and load it as an HF tokenizer from `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_prefix=str(prefix),
        vocab_size=120,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(directory)


def micro_text_config(model_type: str = "qwen2", vocab_size: int = 130) -> dict:
    config = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": model_type == "qwen2",
    }
    return config


def build_micro(text_tokenizer, model_type: str = "qwen2", seed: int = 0, image_tokenizer=None, **overrides):
    """A micro model (2 layers, width 64, K=64, 3x3 grid, depth 4) with random frozen codebooks + processor.

    With `image_tokenizer` the code geometry and codebooks come from it (the tiny one: K=1024, 8x8, depth 4) and
    the processor holds it, so PIL images are encoded and generated codes decoded."""
    torch.manual_seed(seed)
    fields = tiny_fields(depth_head_width=32, depth_head_heads=2, depth_head_layers=2, **MICRO)
    fields.pop("text_config")
    fields.update(overrides)
    text_config = micro_text_config(model_type, len(text_tokenizer) + 8)
    if image_tokenizer is not None:
        processor = DualTokenProcessor(text_tokenizer, image_tokenizer)
        return DualTokenMLLM.from_llm(text_config, processor, **fields).eval(), processor
    processor = DualTokenProcessor(text_tokenizer, grid_size=fields["grid_size"], rq_depth=fields["rq_depth"])
    model = DualTokenMLLM.from_llm(text_config, processor, **fields)
    generator = torch.Generator().manual_seed(seed)
    shape = (fields["codebook_size"], fields["code_dim"])
    model.set_code_embeddings(
        torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    )
    return model.eval(), processor


def random_codes(model, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random (pixel, semantic) pair of (h, w, D) grids for `model`'s geometry."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.grid_size, cfg.grid_size, cfg.rq_depth)
    pixel = torch.randint(0, cfg.codebook_size, shape, generator=generator)
    semantic = torch.randint(0, cfg.codebook_size, shape, generator=generator)
    return pixel, semantic


def tiny_image_tokenizer():
    """The untrained tiny DualToken tokenizer, or None when the tokenizer package does not provide it."""
    try:
        from tokenizer.presets import build_tokenizer
    except ImportError:
        return None
    torch.manual_seed(0)
    return build_tokenizer("tiny").eval()

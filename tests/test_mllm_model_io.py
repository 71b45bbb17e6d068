"""Building DualTokenMLLM from local LLM directories (Qwen2 and Llama) and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from mllm_testing import (
    build_micro,
    micro_text_config,
    random_codes,
    tiny_image_tokenizer,
    train_text_tokenizer,
)
from transformers import AutoConfig, AutoModelForCausalLM

from mllm.generation import GenerationSettings, generate_chat, generate_images
from mllm.modeling import DualTokenMLLM
from mllm.presets import tiny_fields
from mllm.processor import DualTokenProcessor

CONVERSATION = [
    {"role": "user", "content": "<image>\ndraw a purple square"},
    {"role": "assistant", "content": "there are three shapes<image>"},
]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_text_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_wraps_a_causal_lm_saved_in_a_local_directory(tmp_path, text_tokenizer, model_type):
    config = AutoConfig.for_model(**micro_text_config(model_type, vocab_size=len(text_tokenizer)))
    torch.manual_seed(3)
    llm = AutoModelForCausalLM.from_config(config)
    llm_dir = tmp_path / model_type
    llm.save_pretrained(llm_dir)
    reference = {k: v.clone() for k, v in llm.state_dict().items()}

    fields = tiny_fields(depth_head_width=32, depth_head_heads=2, codebook_size=64, code_dim=8, grid_size=3)
    fields.pop("text_config")
    processor = DualTokenProcessor(text_tokenizer, grid_size=3, rq_depth=4)
    model = DualTokenMLLM.from_llm(llm_dir, processor, **fields).eval()
    assert type(model.language_model).__name__ == type(llm).__name__
    assert model.config.text_config.model_type == model_type
    assert model.language_model.config._attn_implementation == "sdpa"
    # Pretrained weights survive the wrapper's initialisation (rows added for new special tokens aside).
    state = model.language_model.state_dict()
    for name, tensor in reference.items():
        rows = tensor.shape[0]
        assert torch.equal(state[name][:rows], tensor), name
    assert (
        model.config.visual_token_offset == model.get_input_embeddings().num_embeddings >= len(text_tokenizer)
    )

    model.set_code_embeddings(torch.randn(64, 8), torch.randn(64, 8))
    batch = processor.collate(
        [processor.training_example(CONVERSATION, [random_codes(model, 1), random_codes(model, 2)])]
    )
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss_pixel > 0 and out.loss_semantic > 0
    out.loss.backward()
    assert model.pixel_head.classifier_weight.grad is not None
    replies = generate_chat(
        model,
        processor,
        [[{"role": "user", "content": "a red circle"}]],
        settings=GenerationSettings(max_new_tokens=4),
    )
    assert 1 <= len(replies[0].token_ids) <= 4


def test_missing_llm_directory_is_a_clear_error(tmp_path, text_tokenizer):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DualTokenMLLM.from_llm(
            tmp_path / "nowhere", DualTokenProcessor(text_tokenizer, grid_size=3, rq_depth=4)
        )


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, text_tokenizer, model_type):
    model, processor = build_micro(text_tokenizer, model_type=model_type, seed=4)
    image_tokenizer = tiny_image_tokenizer()
    if image_tokenizer is not None:
        processor.image_tokenizer = image_tokenizer
    batch = processor.collate(
        [processor.training_example(CONVERSATION, [random_codes(model, 5), random_codes(model, 6)])]
    )
    with torch.no_grad():
        before = model(**batch, logits_to_keep=0)
    settings = GenerationSettings.tiny(image_temperature=1.0, seed=3)
    images_before = generate_images(model, processor, ["a red circle"], settings, decode=False)

    target = tmp_path / "checkpoint"
    model.save_pretrained(target, processor=processor)
    files = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    saved_config = json.loads((target / "config.json").read_text())
    assert saved_config["model_type"] == "dualtoken_mllm"
    assert saved_config["text_config"]["model_type"] == model_type

    loaded = DualTokenMLLM.from_pretrained(target).eval()
    loaded_processor = DualTokenProcessor.from_pretrained(
        target, load_image_tokenizer=image_tokenizer is not None
    )
    assert torch.equal(loaded.pixel_code_embedding, model.pixel_code_embedding)
    reloaded_batch = loaded_processor.collate(
        [loaded_processor.training_example(CONVERSATION, [random_codes(model, 5), random_codes(model, 6)])]
    )
    for key in batch:
        assert torch.equal(batch[key], reloaded_batch[key]), key
    with torch.no_grad():
        after = loaded(**reloaded_batch, logits_to_keep=0)
    for name in ("logits", "last_hidden_state", "pixel_logits", "semantic_logits", "loss"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    images_after = generate_images(loaded, loaded_processor, ["a red circle"], settings, decode=False)
    assert torch.equal(images_before.pixel_codes, images_after.pixel_codes)
    if image_tokenizer is not None:
        assert (target / "image_tokenizer").is_dir()
        assert loaded.config.image_tokenizer_path == "image_tokenizer"

    # Saving again over the same directory replaces the files in place.
    model.save_pretrained(target, processor=processor)
    assert (
        DualTokenMLLM.from_pretrained(target).config.visual_token_offset == model.config.visual_token_offset
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

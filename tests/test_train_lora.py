"""LoRA through peft: only adapters, code MLPs, depth heads and the special-token rows train; merge == adapter."""

from __future__ import annotations

import re

import pytest
import torch
from mllm_testing import build_micro, random_codes
from safetensors.torch import load_file
from train_testing import write_config, write_fixture

from mllm.modeling import DualTokenMLLM
from mllm.processor import DualTokenProcessor
from mllm.sequence import BOI, EOI, TURN_END, TURN_START
from train import mllm_train
from train.lora import load_lora, merge_lora

TRAINABLE = {
    "lora": re.compile(r"base_model\.model\.language_model\..*\.(q_proj|v_proj)\.lora_[AB]\.default\.weight"),
    "visual": re.compile(
        r"base_model\.model\.(pixel_projector|semantic_projector|understanding_projector|pixel_head|semantic_head)"
        r"\.modules_to_save\.default\."
    ),
    "tokens": re.compile(r".*embed_tokens\.token_adapter\.trainable_tokens_delta\.default"),
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    fixture = write_fixture(root / "data")
    from transformers import AutoTokenizer

    text_tokenizer = AutoTokenizer.from_pretrained(fixture["text_tokenizer"])
    base, processor = build_micro(text_tokenizer, seed=4)
    base.save_pretrained(root / "base", processor=processor)
    config = write_config(
        root / "lora.yaml",
        fixture,
        root / "adapter",
        model_name_or_path=str(root / "base"),
        lora=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=3,
        save_steps=10,
        learning_rate=1e-2,
    )
    trainer = mllm_train.main(["--config", str(config)])
    return root, trainer, processor


def test_only_the_intended_parameters_train(lora_run):
    root, trainer, processor = lora_run
    model = trainer.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    kinds = {
        kind: [n for n in trainable if pattern.fullmatch(n) or pattern.match(n)]
        for kind, pattern in TRAINABLE.items()
    }
    assert sorted(n for names in kinds.values() for n in names) == sorted(trainable)
    assert len(kinds["lora"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for module in (
        "pixel_projector",
        "semantic_projector",
        "understanding_projector",
        "pixel_head",
        "semantic_head",
    ):
        assert any(f".{module}." in name for name in kinds["visual"]), module
    vocab = processor.tokenizer.get_vocab()
    (delta,) = [p for n, p in model.named_parameters() if TRAINABLE["tokens"].match(n)]
    assert delta.shape[0] == len({vocab[t] for t in (BOI, EOI, TURN_START, TURN_END)})

    # The frozen LLM weights did not move; the adapters and the fully trained modules did.
    base = load_file(root / "base" / "model.safetensors")
    inner = model.get_base_model()
    q = inner.language_model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, base["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(
        inner.language_model.model.layers[0].mlp.up_proj.weight,
        base["language_model.model.layers.0.mlp.up_proj.weight"],
    )
    assert not torch.equal(
        inner.pixel_head.modules_to_save["default"].classifier_bias, base["pixel_head.classifier_bias"]
    )
    assert q.lora_B["default"].weight.abs().sum() > 0


def test_merged_model_matches_the_adapter_model(lora_run):
    root, _, processor = lora_run
    merged_dir = root / "merged"
    merge_lora(root / "adapter", merged_dir)
    merged = DualTokenMLLM.from_pretrained(merged_dir).eval()
    adapter = load_lora(root / "adapter").eval()
    base = DualTokenMLLM.from_pretrained(root / "base").eval()

    messages = [
        {"role": "user", "content": "<image>\nwhat color is the square"},
        {"role": "assistant", "content": "the answer is green<image>"},
    ]
    batch = processor.collate(
        [processor.training_example(messages, [random_codes(merged, 1), random_codes(merged, 2)])]
    )
    with torch.no_grad():
        outputs = [m(**batch, logits_to_keep=0) for m in (merged, adapter, base)]
    for key in ("logits", "pixel_logits", "semantic_logits"):
        got, want, untrained = (getattr(o, key) for o in outputs)
        assert (got - want).abs().max() <= 1e-5, key
        assert (want - untrained).abs().max() > 1e-3, key  # the adapter changed the model
    assert DualTokenProcessor.from_pretrained(merged_dir).ids == processor.ids

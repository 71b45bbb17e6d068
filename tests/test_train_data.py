"""Training data: caption dropout rate, loss only on answers and generated images, truncation, missing images."""

from __future__ import annotations

import pytest
import torch
from mllm_testing import CORPUS
from torch.utils.data import BatchSampler, DataLoader
from train_testing import QUESTIONS, image_file, write_fixture

from data_recipes.code_shards import CodeShardWriter, CodeStore, image_key
from mllm.processor import DualTokenProcessor
from mllm.sequence import IGNORE_INDEX
from train.data import (
    MLLMCollator,
    MLLMTrainingData,
    SeededLengthGroupedSampler,
    build_training_data,
    truncate_example,
)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("fixture"), images=12)


@pytest.fixture(scope="module")
def processor(fixture):
    from transformers import AutoTokenizer

    return DualTokenProcessor(
        AutoTokenizer.from_pretrained(fixture["text_tokenizer"]), grid_size=3, rq_depth=4
    )


def _batches(dataset, batch_size=8, epoch=0):
    dataset.set_epoch(epoch)
    sampler = SeededLengthGroupedSampler(batch_size, dataset.lengths, seed=5)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, False),
        collate_fn=MLLMCollator(dataset.processor),
    )
    indices = [list(batch) for batch in BatchSampler(sampler, batch_size, False)]
    return list(zip(indices, loader))


def test_caption_dropout_rate_in_the_batch_stream_matches_the_config(tmp_path, processor):
    writer = CodeShardWriter(tmp_path / "codes", (3, 3), 4, 64, "t", "s")
    writer.add([0], torch.zeros(1, 3, 3, 4, dtype=torch.long), torch.ones(1, 3, 3, 4, dtype=torch.long))
    writer.finish()
    store = CodeStore(tmp_path / "codes")
    prompts = [{"prompt": CORPUS[i % len(CORPUS)], "image_id": 0} for i in range(1200)]
    unconditional = processor.t2i_example(
        " ", (torch.zeros(3, 3, 4), torch.ones(3, 3, 4)), drop_caption=False
    )
    prefix = unconditional.input_ids[: unconditional.input_ids.index(processor.ids["boi_token_id"])]

    def observed(dataset, epoch) -> dict[int, bool]:
        """index -> whether its example in the batch stream of `epoch` carries the unconditional caption."""
        dropped = {}
        for indices, batch in _batches(dataset, 64, epoch):
            for index, row in zip(indices, batch["input_ids"].tolist()):
                dropped[index] = row[: len(prefix)] == prefix
        return dropped

    dataset = MLLMTrainingData(processor, store, prompts=prompts, caption_dropout=0.3, seed=11)
    first, second = observed(dataset, 0), observed(dataset, 1)
    assert len(first) == len(second) == 1200
    for run in (first, second):
        assert abs(sum(run.values()) / 1200 - 0.3) < 0.04  # 3 sigma of a binomial(1200, 0.3) rate
    assert first != second  # fresh draws each epoch
    # The draw is a function of (seed, epoch, index) only.
    fresh = MLLMTrainingData(processor, store, prompts=prompts, caption_dropout=0.3, seed=11)
    fresh.set_epoch(1)
    assert {i: fresh.is_caption_dropped(i) for i in range(1200)} == second
    other_seed = MLLMTrainingData(processor, store, prompts=prompts, caption_dropout=0.3, seed=12)
    assert {i: other_seed.is_caption_dropped(i) for i in range(1200)} != first
    none = MLLMTrainingData(processor, store, prompts=prompts[:50], caption_dropout=0.0, seed=11)
    assert not any(observed(none, 0).values())
    every = MLLMTrainingData(processor, store, prompts=prompts[:50], caption_dropout=1.0, seed=11)
    assert all(observed(every, 0).values())


def _labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token  # labels are the input ids themselves (the model shifts)
            current.append(token)
    return spans + ([current] if current else [])


def test_prompt_tokens_never_carry_loss(fixture, processor):
    dataset = build_training_data(
        processor,
        fixture["code_store"],
        [fixture["llava"]],
        [fixture["prompts"]],
        caption_dropout=0.5,
        seed=3,
    )
    decode = processor.tokenizer.decode
    img = processor.ids["img_token_id"]
    seen = {"chat": 0, "t2i": 0}
    for indices, batch in _batches(dataset, batch_size=5):
        images = 0
        for row, index in enumerate(indices):
            item = dataset.items[index]
            ids = batch["input_ids"][row].tolist()
            labels = batch["labels"][row].tolist()
            mask = batch["attention_mask"][row].tolist()
            assert all(label == IGNORE_INDEX for label, real in zip(labels, mask) if not real)
            assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == img)
            spans = [
                decode(span, skip_special_tokens=False).replace(" ", "")
                for span in _labelled_spans(ids, labels)
            ]
            if item.kind == "chat":
                answer = dataset.conversations[item.record]["conversations"][1]["value"]
                assert spans == [answer.replace(" ", "") + "<|im_end|>"]
                question = dataset.conversations[item.record]["conversations"][0]["value"]
                assert not any(question.split("\n")[-1].replace(" ", "") in span for span in spans)
            else:
                assert spans == ["<boi>", "<eoi><|im_end|>"]
            seen[item.kind] += 1
            images += ids.count(processor.ids["boi_token_id"])
        outputs = batch.get("image_is_output", torch.zeros(0, dtype=torch.bool))
        assert outputs.numel() == images
    assert seen["chat"] == 13 and seen["t2i"] == 12


def test_truncation_never_splits_an_image(fixture, processor):
    codes = (torch.zeros(3, 3, 4, dtype=torch.long), torch.zeros(3, 3, 4, dtype=torch.long))
    messages = [
        {"role": "user", "content": "<image>\n" + QUESTIONS[0]},
        {"role": "assistant", "content": "draw a purple square<image>"},
    ]
    example = processor.training_example(messages, [codes, codes])
    boi, eoi = processor.ids["boi_token_id"], processor.ids["eoi_token_id"]
    second_boi = [i for i, t in enumerate(example.input_ids) if t == boi][1]
    for cut in (second_boi + 1, second_boi + 5, len(example.input_ids) - 2):
        short = truncate_example(example, cut, boi, eoi)
        assert short.input_ids == example.input_ids[:second_boi] and short.num_images == 1
        assert short.image_is_output == [False] and short.pixel_codes.shape[0] == 1
    whole = truncate_example(example, len(example.input_ids), boi, eoi)
    assert whole.input_ids == example.input_ids and whole.num_images == 2
    first_boi = example.input_ids.index(boi)
    none = truncate_example(example, first_boi + 3, boi, eoi)
    assert (
        none.input_ids == example.input_ids[:first_boi] and none.num_images == 0 and none.pixel_codes is None
    )


def test_missing_images_raise_or_are_skipped(fixture, processor):
    store = CodeStore(fixture["code_store"])
    records = [
        {"prompt": "a red circle", "file": image_file(0)},
        {"prompt": "a red circle", "file": "images/x.png"},
    ]
    with pytest.raises(KeyError, match="images/x.png"):
        MLLMTrainingData(processor, store, prompts=records)
    dataset = MLLMTrainingData(processor, store, prompts=records, skip_missing_images=True)
    assert len(dataset) == 1 and dataset.skipped_missing == 1
    assert image_key(image_file(0)) in store


def test_source_repeats_and_the_seeded_sampler(fixture, processor):
    dataset = build_training_data(
        processor,
        fixture["code_store"],
        [fixture["llava"]],
        [fixture["prompts"]],
        conversation_repeat=2.0,
        prompt_repeat=0.5,
    )
    kinds = [item.kind for item in dataset.items]
    assert kinds.count("chat") == 26 and kinds.count("t2i") == 6
    order = list(SeededLengthGroupedSampler(4, dataset.lengths, seed=1))
    again = SeededLengthGroupedSampler(4, dataset.lengths, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(again) == order and sorted(order) == list(range(len(dataset)))
    again.set_epoch(1)
    assert list(again) != order

"""DualTokenProcessor: special tokens, chat template, label masking, image expansion, T2I prompts, batching,
persistence and input errors."""

from __future__ import annotations

import json

import pytest
import torch
from mllm_testing import train_text_tokenizer

from mllm.processor import CHAT_TEMPLATE, DualTokenProcessor, ensure_special_tokens, special_token_ids
from mllm.sequence import BOI, EOI, IMAGE_PLACEHOLDER, IMG, TURN_END, TURN_START

GRID, DEPTH, K = 2, 3, 16


@pytest.fixture()
def processor(tmp_path):
    return DualTokenProcessor(train_text_tokenizer(tmp_path / "sp"), grid_size=GRID, rq_depth=DEPTH)


def codes(seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (GRID, GRID, DEPTH)
    return torch.randint(0, K, shape, generator=generator), torch.randint(0, K, shape, generator=generator)


CHAT = [
    {"role": "system", "content": "describe the image please"},
    {"role": "user", "content": "<image>\nwhat color is the square"},
    {"role": "assistant", "content": "the answer is green"},
    {"role": "user", "content": "how many shapes are there"},
    {"role": "assistant", "content": "there are three shapes"},
]


def test_special_tokens_are_added_once(tmp_path):
    tokenizer = train_text_tokenizer(tmp_path / "sp")
    before = len(tokenizer)
    assert ensure_special_tokens(tokenizer) == 6
    assert ensure_special_tokens(tokenizer) == 0
    assert len(tokenizer) == before + 6
    ids = special_token_ids(tokenizer)
    for token in (IMAGE_PLACEHOLDER, BOI, EOI, IMG, TURN_END):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
    assert ids["img_token_id"] == tokenizer.convert_tokens_to_ids(IMG)
    assert ids["turn_end_token_id"] == tokenizer.convert_tokens_to_ids(TURN_END)


def test_chat_template_renders_chatml_turns(processor):
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE
    text = processor.apply_chat_template(CHAT[:3])
    assert text == (
        "<s><|im_start|>system\ndescribe the image please<|im_end|>\n"
        "<|im_start|>user\n<image>\nwhat color is the square<|im_end|>\n"
        "<|im_start|>assistant\nthe answer is green<|im_end|>"
    )
    prompt = processor.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert prompt.endswith(f"{TURN_END}\n{TURN_START}assistant\n") and text.startswith(prompt)


def test_training_labels_keep_only_assistant_answers(processor):
    example = processor.training_example(CHAT, [codes(0)])
    tokenizer = processor.tokenizer
    answers = []
    run: list[int] = []
    for token, label in zip(example.input_ids, example.labels):
        if label == -100:
            if run:
                answers.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        answers.append(run)
    texts = [tokenizer.decode(a, skip_special_tokens=False) for a in answers]
    assert len(texts) == 2
    assert texts[0].replace(" ", "") == f"theanswerisgreen{TURN_END}"
    assert texts[1].replace(" ", "") == f"therearethreeshapes{TURN_END}"
    assert example.image_is_output == [False]


def test_inference_prompt_is_the_prefix_of_the_training_example(processor):
    for cut in (2, 4):
        prompt = processor.inference_prompt(CHAT[:cut], [codes(0)])
        full = processor.training_example(CHAT[: cut + 1], [codes(0)])
        history = processor.training_example(CHAT[:cut], [codes(0)])
        n_hist, n_prompt = len(history.input_ids), len(prompt.input_ids)
        assert full.input_ids[:n_prompt] == prompt.input_ids
        assert prompt.input_ids[:n_hist] == history.input_ids
        assert full.labels[:n_hist] == history.labels
        assert all(label == -100 for label in full.labels[n_hist:n_prompt])
        assert full.labels[n_prompt] != -100


def test_images_expand_to_cells_and_output_images_are_marked(processor):
    ids = processor.ids
    cells = GRID * GRID
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "draw a purple square"}]},
        {"role": "assistant", "content": "there are three shapes<image>"},
    ]
    example = processor.training_example(conversation, [codes(1), codes(2)])
    assert example.image_is_output == [False, True]
    assert example.pixel_codes.shape == (2, GRID, GRID, DEPTH)
    assert torch.equal(example.pixel_codes[1], codes(2)[0]) and torch.equal(
        example.semantic_codes[0], codes(1)[1]
    )
    assert ids["image_token_id"] not in example.input_ids
    starts = [i for i, t in enumerate(example.input_ids) if t == ids["boi_token_id"]]
    assert len(starts) == 2
    for start, is_output in zip(starts, example.image_is_output):
        span = example.input_ids[start : start + cells + 2]
        assert span == [ids["boi_token_id"], *[ids["img_token_id"]] * cells, ids["eoi_token_id"]]
        labels = example.labels[start : start + cells + 2]
        assert labels[1:-1] == [-100] * cells
        expected_ends = [ids["boi_token_id"], ids["eoi_token_id"]] if is_output else [-100, -100]
        assert [labels[0], labels[-1]] == expected_ends


def test_text_to_image_prompts(processor):
    ids = processor.ids
    prompt = processor.t2i_prompt("a red circle")
    unconditional = processor.unconditional_prompt()
    assert prompt[-1] == ids["boi_token_id"] and unconditional[-1] == ids["boi_token_id"]
    assert processor.decode(prompt[:-1], skip_special_tokens=False).endswith("assistant\n".strip())
    assert "red" in processor.decode(prompt) and "red" not in processor.decode(unconditional)
    example = processor.t2i_example("a red circle", codes(3))
    assert example.input_ids[: len(prompt)] == prompt and example.image_is_output == [True]
    dropped = processor.t2i_example("a red circle", codes(3), drop_caption=True)
    assert dropped.input_ids[: len(unconditional)] == unconditional
    custom = DualTokenProcessor(
        processor.tokenizer, t2i_template="draw {caption}", grid_size=GRID, rq_depth=DEPTH
    )
    assert "draw" in custom.decode(custom.t2i_prompt("a red circle"))
    with pytest.raises(ValueError, match="caption"):
        DualTokenProcessor(processor.tokenizer, t2i_template="no slot")


def test_collate_pads_and_orders_images(processor):
    short = processor.training_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], [codes(4)]
    )
    long = processor.training_example(CHAT, [codes(5)])
    right = processor.collate([long, short])
    left = processor.collate([long, short], padding_side="left")
    pad = processor.ids["pad_token_id"]
    gap = len(long.input_ids) - len(short.input_ids)
    assert right["input_ids"][1, -gap:].tolist() == [pad] * gap and right["labels"][1, -gap:].eq(-100).all()
    assert left["input_ids"][1, :gap].tolist() == [pad] * gap and left["attention_mask"][1, :gap].eq(0).all()
    assert torch.equal(right["pixel_codes"][0], codes(5)[0]) and torch.equal(
        right["pixel_codes"][1], codes(4)[0]
    )
    assert right["image_is_output"].tolist() == [False, True]


def test_save_and_load(processor, tmp_path):
    processor.settings.default_system = "describe the image please"
    processor.save_pretrained(tmp_path / "proc")
    config = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert config["grid_size"] == GRID and config["rq_depth"] == DEPTH
    loaded = DualTokenProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.ids == processor.ids
    for conversation in (CHAT, CHAT[1:3]):
        assert (
            loaded.training_example(conversation, [codes(6)]).input_ids
            == processor.training_example(conversation, [codes(6)]).input_ids
        )
    assert "describe the image please" in loaded.apply_chat_template(CHAT[1:3])
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        DualTokenProcessor.from_pretrained(tmp_path)


def test_bad_inputs_raise_clear_errors(processor):
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor.training_example([{"role": "user", "content": "<image><image>"}], [codes(0)])
    with pytest.raises(ValueError, match="role 'robot'"):
        processor.training_example([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="PIL images need an image tokenizer"):
        from PIL import Image

        processor.training_example([{"role": "user", "content": "<image>"}], [Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="expected a PIL image or codes"):
        processor.training_example([{"role": "user", "content": "<image>"}], ["picture.png"])
    with pytest.raises(ValueError, match="reserved tokens"):
        processor.training_example([{"role": "user", "content": "hi <img> there"}])
    wrong = (torch.zeros(GRID + 1, GRID + 1, DEPTH, dtype=torch.long),) * 2
    with pytest.raises(ValueError, match="this processor expects"):
        processor.training_example([{"role": "user", "content": "<image>"}], [wrong])

"""The SentencePiece text tokenizer wrapped as an HF tokenizer: round trips, special tokens, ids, determinism."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm

from data_recipes.shapes import sample_scene
from data_recipes.shapes_dataset import write_shapes_dataset
from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX, captions, chat
from mllm.processor import DualTokenProcessor
from mllm.sequence import PROMPT_PIECES, SPECIAL_TOKENS
from tokenizer.text_tokenizer import (
    SETTINGS_NAME,
    load_text_tokenizer,
    texts_from_dataset,
    train_text_tokenizer,
)


def shapes_texts(seed: int, scenes: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(scenes):
        scene = sample_scene(rng)
        texts += captions(scene)
        texts += [turn["value"] for turn in chat(scene, rng)]
    return texts


CORPUS = shapes_texts(0, 150)
UNSEEN = shapes_texts(1, 20)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = train_text_tokenizer(
        CORPUS, directory, vocab_size=380, model_type=request.param, seed=0, special_tokens=SPECIAL_TOKENS
    )
    return directory, tokenizer


def test_round_trip_of_shapes_sentences(trained):
    _, tokenizer = trained
    for text in CORPUS[:200] + UNSEEN + ["Qué? 12 zebras\tand\nnewlines", "<image>\nWhat color is the star?"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
        with_bos = tokenizer(text).input_ids
        assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == ids
        assert tokenizer.decode(with_bos, skip_special_tokens=True) == text.replace("<image>", "")
    assert tokenizer.unk_token_id not in tokenizer("Qué? ✓ 😀", add_special_tokens=False).input_ids


def test_ids_match_sentencepiece(trained):
    directory, tokenizer = trained
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    texts = [t for t in CORPUS + UNSEEN if not t.startswith("<")]
    assert [tokenizer(t, add_special_tokens=False).input_ids for t in texts] == processor.encode(texts)
    # words are whole pieces after training on them
    assert len(tokenizer(" circle", add_special_tokens=False).input_ids) == 1


def test_special_tokens_are_single_ids_and_never_split(trained):
    _, tokenizer = trained
    assert (
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ) == (
        0,
        1,
        2,
        3,
    )
    vocab = tokenizer.get_vocab()
    special_ids = [vocab[token] for token in SPECIAL_TOKENS]
    assert len(set(special_ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, special_ids):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
        ids = tokenizer(f"a red{token}circle{token}{token}", add_special_tokens=False).input_ids
        assert ids.count(token_id) == 3
        assert tokenizer.decode(ids) == f"a red{token}circle{token}{token}"
        assert token not in tokenizer.decode(ids, skip_special_tokens=True)
    partial = tokenizer("<imag <boi", add_special_tokens=False).input_ids
    assert not set(partial) & set(special_ids)
    batch = tokenizer(["a red circle", "two blue squares at the top"], padding=True)
    assert batch.input_ids[0][-1] == tokenizer.pad_token_id and batch.attention_mask[0][-1] == 0


def test_deterministic_and_reload_gives_identical_ids(trained, tmp_path):
    directory, tokenizer = trained
    model_type = json.loads((directory / SETTINGS_NAME).read_text())["model_type"]
    again = train_text_tokenizer(
        CORPUS,
        tmp_path / "again",
        vocab_size=380,
        model_type=model_type,
        seed=0,
        special_tokens=SPECIAL_TOKENS,
    )
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (
        directory / "tokenizer.model"
    ).read_bytes()
    reloaded = load_text_tokenizer(directory)
    texts = CORPUS[:50] + UNSEEN
    expected = tokenizer(texts).input_ids
    assert reloaded(texts).input_ids == expected
    assert again(texts).input_ids == expected
    assert len(reloaded) == len(tokenizer) == 380


def test_vocab_size_is_capped_or_rejected(tmp_path):
    texts = CORPUS[:60]
    with pytest.warns(UserWarning, match="capped 100000"):
        tokenizer = train_text_tokenizer(
            texts, tmp_path / "capped", vocab_size=100_000, special_tokens=SPECIAL_TOKENS
        )
    settings = json.loads((tmp_path / "capped" / SETTINGS_NAME).read_text())
    assert settings["requested_vocab_size"] == 100_000
    assert settings["vocab_size"] == len(tokenizer) < 100_000
    with pytest.raises(ValueError, match="use at least"):
        train_text_tokenizer(texts, tmp_path / "small", vocab_size=64, special_tokens=SPECIAL_TOKENS)
    assert not (tmp_path / "small").exists()
    with pytest.raises(ValueError, match="model_type"):
        train_text_tokenizer(texts, tmp_path / "x", model_type="wordpiece")
    with pytest.raises(ValueError, match="no non-blank text"):
        train_text_tokenizer(["", "  "], tmp_path / "x")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_prompt_pieces_are_one_id_each_and_match_sentencepiece(model_type, tmp_path):
    """The tiny preset's fixed prompt strings (turn headers, the short-answer instruction, which holds spaces) are one
    id each, in the HF tokenizer and in SentencePiece alike, and a chat-formatted VQA turn shrinks by what spelling
    them out costs, its answer unchanged."""
    texts = CORPUS + [f"<image>\nWhat color is the star?{SHORT_ANSWER_SUFFIX}"] * 20
    compact = train_text_tokenizer(
        texts,
        tmp_path / "c",
        vocab_size=380,
        model_type=model_type,
        special_tokens=(*SPECIAL_TOKENS, *PROMPT_PIECES),
    )
    spelled = train_text_tokenizer(
        texts, tmp_path / "s", vocab_size=380, model_type=model_type, special_tokens=SPECIAL_TOKENS
    )
    vocab = compact.get_vocab()
    for piece in PROMPT_PIECES:
        assert compact(piece, add_special_tokens=False).input_ids == [vocab[piece]]
    question = f"What color is the shape on the left?{SHORT_ANSWER_SUFFIX}"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "c" / "tokenizer.model"))
    ids = compact(question, add_special_tokens=False).input_ids
    assert ids == sp.encode(question) and ids[-1] == vocab[SHORT_ANSWER_SUFFIX]
    assert compact.decode(ids) == question
    turn = [{"role": "user", "content": question}, {"role": "assistant", "content": "red"}]
    examples = [DualTokenProcessor(tokenizer).training_example(turn, []) for tokenizer in (compact, spelled)]
    lengths = [len(example.input_ids) for example in examples]
    answers = [t.decode([i for i in e.labels if i >= 0]) for t, e in zip((compact, spelled), examples)]
    rendered = [t.decode(e.input_ids) for t, e in zip((compact, spelled), examples)]
    assert [examples[0].input_ids.count(vocab[piece]) for piece in PROMPT_PIECES] == [0, 1, 1, 1]
    assert lengths[1] - lengths[0] >= 20 and rendered[0] == rendered[1], (lengths, rendered)
    assert answers == ["red<|im_end|>", "red<|im_end|>"]
    with pytest.raises(ValueError, match="metaspace"):
        train_text_tokenizer(texts, tmp_path / "m", vocab_size=380, special_tokens=("a\u2581b",))


def test_texts_from_dataset_and_llava_json(tmp_path):
    write_shapes_dataset(tmp_path / "data", n=24, size=32, workers=0, verbose=False)
    texts = texts_from_dataset(tmp_path / "data")
    captions_file = json.loads((tmp_path / "data" / "train" / "captions.json").read_text())
    assert {a["caption"] for a in captions_file["annotations"]} <= set(texts)
    assert any(t.startswith("<image>\n") for t in texts)
    assert "a red circle" in texts  # the zero-shot class names
    llava = [
        {
            "id": "1",
            "image": "x.png",
            "conversations": [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Yes."}],
        }
    ]
    (tmp_path / "chat.json").write_text(json.dumps(llava))
    assert texts_from_dataset(tmp_path / "chat.json") == ["<image>\nHi?", "Yes."]
    with pytest.raises(ValueError, match="manifest.json"):
        texts_from_dataset(tmp_path)

"""`dualtoken ask | chat | generate | mllm` end to end through `mllm.console.main`, on a micro model saved with the
untrained tiny DualToken tokenizer (real PNGs in and out)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from mllm_testing import build_micro, tiny_image_tokenizer, train_text_tokenizer
from PIL import Image
from safetensors.torch import load_file

from mllm import cli
from mllm.console import build_parser, main
from mllm.generation import GenerationSettings, generate_chat, generate_images
from mllm.modeling import DualTokenMLLM


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_text_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_tokenizer):
    """(directory, model, processor): a micro model + processor with the tiny image tokenizer, saved once."""
    image_tokenizer = tiny_image_tokenizer()
    if image_tokenizer is None:
        pytest.skip(
            "tokenizer.presets.build_tokenizer is not available: no image tokenizer to encode/decode PNGs"
        )
    model, processor = build_micro(text_tokenizer, seed=21, image_tokenizer=image_tokenizer)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(directory, processor=processor)
    return directory, model, processor


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A non-square RGBA PNG (load_image composites it; the processor resizes it to the tokenizer's size)."""
    path = tmp_path_factory.mktemp("img") / "photo.png"
    image = Image.new("RGBA", (50, 38), (255, 255, 255, 0))
    for x in range(10, 30):
        for y in range(5, 25):
            image.putpixel((x, y), (200, 30, 30, 255))
    image.save(path)
    return path


def test_ask_answers_like_the_library(checkpoint, photo, capsys):
    directory, model, processor = checkpoint
    argv = ["ask", "--model", str(directory), "--image", str(photo), "--question", "what color is the square"]
    argv += ["--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    answer = capsys.readouterr().out
    from data_recipes.image_io import load_image

    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=3)
    conversation = [{"role": "user", "content": "<image>\nwhat color is the square"}]
    (expected,) = generate_chat(model, processor, [conversation], [[load_image(photo)]], settings)
    assert answer == expected.text + "\n"
    assert len(expected.token_ids) == 6  # an untrained model talks until the budget


def test_ask_reports_bad_inputs_cleanly(tmp_path, checkpoint, capsys):
    directory, _, _ = checkpoint
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert main(["ask", "--model", str(directory), "--image", str(broken), "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualtoken ask: error: cannot read image") and str(broken) in err
    assert "Traceback" not in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path), "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert "is not an MLLM checkpoint: config.json is missing" in err


class ProgressRecorder:
    """Stands in for tqdm.tqdm: records the total and the updates the progress callback makes."""

    made: list[ProgressRecorder] = []

    def __init__(self, total, **kwargs):
        self.total, self.done, self.closed = total, 0, False
        ProgressRecorder.made.append(self)

    def update(self, n=1):
        self.done += n

    def close(self):
        self.closed = True


def test_generate_writes_pngs_codes_and_an_index(tmp_path, checkpoint, monkeypatch):
    directory, model, processor = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    specs = [
        {"prompt": "a red circle", "tag": "single"},
        {"prompt": "two blue triangles"},
        {"prompt": "a star"},
    ]
    prompts.write_text("".join(json.dumps(s) + "\n" for s in specs) + "\n")
    common = ["generate", "--model", str(directory), "--prompts-file", str(prompts), "--n", "2"]
    common += ["--cfg", "3.0", "--top-k", "50", "--top-p", "0.9", "--seed", "5"]
    monkeypatch.setattr("tqdm.tqdm", ProgressRecorder)
    assert main([*common, "--out", str(tmp_path / "a"), "--batch-size", "2"]) == 0
    (bar,) = ProgressRecorder.made
    cells = model.config.num_image_positions
    assert bar.total == bar.done == 2 * cells and bar.closed  # two batches, one update per generated cell
    monkeypatch.undo()
    rows = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in specs] and rows[0]["tag"] == "single"
    assert [r["seeds"] for r in rows] == [[5, 6], [7, 8], [9, 10]]
    size = model.config.image_size
    for row in rows:
        assert len(row["files"]) == 2
        for name in row["files"]:
            with Image.open(tmp_path / "a" / name) as image:
                assert image.format == "PNG" and image.size == (size, size) and image.mode == "RGB"
        codes = load_file(tmp_path / "a" / row["codes"])
        assert codes["pixel"].shape == codes["semantic"].shape == (2, 8, 8, model.config.rq_depth)
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert (settings["cfg_scale"], settings["image_top_k"], settings["image_top_p"]) == (3.0, 50, 0.9)

    # The library gives the same codes for prompt 1 (rows 2, 3 of the run: seed 5 + 2).
    library = generate_images(
        model,
        processor,
        ["two blue triangles"],
        GenerationSettings(cfg_scale=3.0, image_top_k=50, image_top_p=0.9, images_per_prompt=2, seed=7),
        decode=False,
    )
    assert torch.equal(load_file(tmp_path / "a" / rows[1]["codes"])["pixel"], library.pixel_codes[0])

    # Another batch size gives identical files: every image has its own seed.
    assert main([*common, "--out", str(tmp_path / "b"), "--batch-size", "3", "--no-progress"]) == 0
    for row in rows:
        first, second = (load_file(tmp_path / run / row["codes"]) for run in ("a", "b"))
        assert torch.equal(first["pixel"], second["pixel"]) and torch.equal(
            first["semantic"], second["semantic"]
        )
        for name in row["files"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not torch.equal(
        load_file(tmp_path / "a" / rows[0]["codes"])["pixel"][0], library.pixel_codes[0, 0]
    )


def test_generate_rejects_a_bad_prompts_file(tmp_path, checkpoint, capsys):
    directory, _, _ = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"caption": "no prompt field"}\n')
    argv = [
        "generate",
        "--model",
        str(directory),
        "--prompts-file",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert f"{prompts}:2: expected a JSON object" in capsys.readouterr().err


def _chat(monkeypatch, capsys, directory, out, lines, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    argv = ["chat", "--model", str(directory), "--out", str(out), "--max-new-tokens", "4", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_chat_repl_attaches_draws_saves_and_resets(tmp_path, checkpoint, photo, monkeypatch, capsys):
    directory, model, _ = checkpoint
    transcript, empty = tmp_path / "conversation.json", tmp_path / "empty.json"
    lines = [
        f"/image {photo}",
        f"/image {tmp_path / 'missing.png'}",
        "what color is the square",
        "/draw a red circle",
        "and now?",
        f"/save {transcript}",
        "/reset",
        f"/save {empty}",
        "/frobnicate",
        "/quit",
        "never read",
    ]
    out = _chat(monkeypatch, capsys, directory, tmp_path / "drawn", lines, "--no-image-output")
    assert out[0] == f"(image attached: {photo})"
    assert out[1].startswith("error: cannot read image") and "missing.png" in out[1]
    assert out[2].startswith("assistant: ")
    drawn = tmp_path / "drawn" / "turn001_0.png"
    assert out[3] == f"assistant: [image: {drawn}]" and out[4] == f"saved image: {drawn}"
    with Image.open(drawn) as image:
        assert image.size == (model.config.image_size,) * 2
    assert out[5].startswith("assistant: ")
    assert out[6:9] == [f"(saved {transcript})", "(new conversation)", f"(saved {empty})"]
    assert out[9].startswith("error: unknown command /frobnicate") and len(out) == 10

    saved = json.loads(transcript.read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == "<image>\nwhat color is the square"
    assert saved["messages"][2]["content"] == "a red circle" and saved["messages"][3]["content"] == "<image>"
    assert saved["images"] == [
        {"path": str(photo), "source": "user"},
        {"path": str(drawn), "source": "model"},
    ]
    assert json.loads(empty.read_text()) == {"messages": [], "images": []}


def test_chat_saves_an_image_the_model_opens_itself(tmp_path, checkpoint, monkeypatch, capsys):
    directory, model, _ = checkpoint
    original = DualTokenMLLM.text_logits

    def eager_to_draw(self, hidden):  # the model always wants to open an image (interleaved mode)
        logits = original(self, hidden)
        logits[..., self.config.boi_token_id] += 1e4
        return logits

    monkeypatch.setattr(DualTokenMLLM, "text_logits", eager_to_draw)
    transcript = tmp_path / "c.json"
    out = _chat(
        monkeypatch, capsys, directory, tmp_path / "drawn", ["draw a purple square", f"/save {transcript}"]
    )
    path = tmp_path / "drawn" / "turn000_0.png"
    assert out[0].startswith(f"assistant: [image: {path}]") and out[1] == f"saved image: {path}"
    with Image.open(path) as image:
        assert image.size == (model.config.image_size,) * 2
    saved = json.loads(transcript.read_text())
    assert saved["messages"][1]["content"].startswith("<image>")
    assert saved["images"] == [{"path": str(path), "source": "model"}]


def test_mllm_group_and_optional_subcommands(tmp_path, monkeypatch, capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"ask", "chat", "generate", "mllm"} <= set(commands)
    mllm_commands = commands["mllm"]._subparsers._group_actions[0].choices
    assert "text-tokenizer" in mllm_commands

    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    cli._register_optional(sub, "not-yet", "mllm.no_such_module", "register")
    args = sub.choices["not-yet"].parse_args([])
    assert args.func(args) == 2
    assert "mllm.no_such_module is missing" in capsys.readouterr().err
    # A module that exists but fails to import is a bug to show, not an absent command to stub.
    (tmp_path / "broken_cli_module.py").write_text("import no_such_dependency_for_this_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_for_this_test"):
        cli._register_optional(sub, "broken", "broken_cli_module", "register")

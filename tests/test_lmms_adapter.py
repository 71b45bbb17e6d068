"""The lmms-eval adapter (eval/lmms_adapter.py) and the shapes_vqa task (eval/lmms_tasks/shapes_vqa/) on a micro
model saved with the untrained tiny DualToken tokenizer.

The task converter and hooks are tested everywhere. The adapter tests need lmms-eval and skip, saying how to install
it, where it is absent: `generate_until` against the library's `generate_chat` (prompt layout, batch vs single,
stop strings, max_new_tokens), `generate_until_multi_round`, the entry point, and `python -m lmms_eval` end to end
on a local shapes-world task, whose answers must equal `dualtoken eval vqa`'s.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mllm_testing import build_micro, tiny_image_tokenizer, train_text_tokenizer
from PIL import Image

from data_recipes.shapes_dataset import write_shapes_dataset
from data_recipes.shapes_text import SHORT_ANSWER_SUFFIX
from eval.lmms_tasks.shapes_vqa import prepare, utils
from eval.vqa_accuracy import vqa_score

REPO = Path(__file__).resolve().parents[1]
LMMS_REASON = (
    "lmms-eval is not installed; install it without torchvision: "
    '.venv/bin/pip install --no-build-isolation -e ".[lmms]" && .venv/bin/pip install --no-deps '
    "lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 "
    "tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1"
)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    data = tmp_path_factory.mktemp("lmms_shapes")
    write_shapes_dataset(data, n=100, size=64, seed=5, verbose=False)
    return data / "test"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, model, processor): a micro model with the tiny image tokenizer, saved once."""
    image_tokenizer = tiny_image_tokenizer()
    if image_tokenizer is None:
        pytest.skip("tokenizer.presets.build_tokenizer is not available: no image tokenizer to encode images")
    root = tmp_path_factory.mktemp("lmms_ckpt")
    # The untied (llama) micro model's greedy replies depend on the prompt and on where the image sits; the tied
    # qwen2 one repeats a single token whatever it is asked, which would hide prompt-format mistakes.
    model, processor = build_micro(
        train_text_tokenizer(root / "sp"), model_type="llama", seed=0, image_tokenizer=image_tokenizer
    )
    model.save_pretrained(root / "model", processor=processor)
    return root / "model", model, processor


@pytest.fixture(scope="module")
def adapter_module():
    pytest.importorskip("lmms_eval", reason=LMMS_REASON)
    import eval.lmms_adapter as adapter_module

    return adapter_module


@pytest.fixture(scope="module")
def lm(adapter_module, checkpoint):
    directory, _, _ = checkpoint
    return adapter_module.DualTokenLMMS(
        pretrained=str(directory), device="cpu", batch_size=4, max_new_tokens=8
    )


def _image(color, size=(40, 30)):
    return Image.new("RGB", size, color)


DOCS = [
    {"question": "what color is the square", "images": [_image((200, 30, 30))]},
    {"question": "how many shapes are there in this picture please", "images": [_image((30, 30, 200))]},
    {"question": "describe the image", "images": []},
    {
        "question": "<image> and <image>: which is red",
        "images": [_image((200, 30, 30)), _image((30, 200, 30))],
    },
    {"question": "a yellow star", "images": [_image((220, 220, 0), (64, 64))]},
]


def _doc_to_visual(doc):
    return doc["images"]


def _requests(adapter_module, gen_kwargs, docs=DOCS, task="toy"):
    from lmms_eval.api.instance import Instance

    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), _doc_to_visual, i, task, "test"),
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def _library_replies(model, processor, settings, docs=DOCS):
    """What `generate_chat` answers, one conversation at a time, with images put first when unplaced."""
    from mllm.generation import generate_chat

    replies = []
    for doc in docs:
        text = doc["question"]
        if "<image>" not in text:
            text = "<image>\n" * len(doc["images"]) + text
        conversation = [{"role": "user", "content": text}]
        replies.append(generate_chat(model, processor, [conversation], [doc["images"]], settings)[0].text)
    return replies


def _with_batch_size(lm, size, requests):
    previous = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = size
    try:
        return lm.generate_until(requests)
    finally:
        lm.batch_size_per_gpu = previous


# ------------------------------------------------------------------ task converter and hooks (no lmms-eval needed)


def test_prepare_writes_one_record_per_question_and_a_task_yaml_naming_the_file(split, tmp_path):
    config = prepare.prepare_task(split, tmp_path / "task")
    questions = json.loads((split / "vqa_questions.json").read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads((split / "vqa_annotations.json").read_text())["annotations"]
    }
    rows = [json.loads(line) for line in (tmp_path / "task" / prepare.DATA_NAME).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    for row in rows:
        annotation = annotations[row["question_id"]]
        assert row["answers"] == [a["answer"] for a in annotation["answers"]] and len(row["answers"]) == 10
        assert row["question_type"] == annotation["question_type"]
        assert Path(row["image"]).is_file() and Path(row["image"]).name == f"{row['image_id']:07d}.png"
    heldout = {
        json.loads(line)["image_id"]
        for line in (split / "scenes.jsonl").read_text().splitlines()
        if json.loads(line)["heldout"]
    }
    assert {r["image_id"] for r in rows if r["heldout"]} == {r["image_id"] for r in rows} & heldout
    task = yaml.safe_load(config.read_text())
    assert task["task"] == "shapes_vqa" and Path(task["include"]) == prepare.TEMPLATE
    assert task["dataset_kwargs"]["data_files"]["test"] == str(
        (tmp_path / "task" / prepare.DATA_NAME).resolve()
    )
    template = prepare.TEMPLATE.read_text()
    assert "\ntask:" not in template  # never indexed as a task of its own


def test_prepare_names_the_missing_file_or_field(split, tmp_path):
    with pytest.raises(FileNotFoundError, match="vqa_questions.json is missing"):
        prepare.prepare_task(tmp_path / "nowhere", tmp_path / "task")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("vqa_questions.json", "vqa_annotations.json"):
        (broken / name).write_text((split / name).read_text())
    with pytest.raises(FileNotFoundError, match=r"0+\d+\.png is missing"):
        prepare.vqa_records(broken)
    annotations = json.loads((split / "vqa_annotations.json").read_text())
    del annotations["annotations"][0]["answers"]
    (broken / "vqa_annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"annotation 0 lacks \['answers'\]"):
        prepare.vqa_records(broken)


def test_hooks_give_the_short_answer_prompt_the_image_and_the_vqa_score(split):
    doc = prepare.vqa_records(split)[0]
    assert utils.doc_to_text(doc) == doc["question"] + SHORT_ANSWER_SUFFIX
    assert utils.doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": ""}) == "Q: " + doc["question"]
    (image,) = utils.doc_to_visual(doc)
    assert image.mode == "RGB" and image.size == (64, 64)
    right = doc["answers"][0]
    assert utils.process_results(doc, [f"  {right.upper()}."]) == {"vqa_accuracy": 100.0}
    assert utils.process_results(doc, ["no idea"]) == {"vqa_accuracy": 0.0}
    with pytest.raises(ValueError, match="expected exactly one"):
        utils.process_results(doc, ["a", "b"])


# ------------------------------------------------------------------ adapter (lmms-eval needed)


def test_gen_kwargs_map_to_generation_settings(adapter_module, caplog):
    settings = adapter_module.generation_settings
    greedy = settings({"temperature": 0.7, "do_sample": False, "until": "\n\n"}, 32, 5)
    assert (greedy.temperature, greedy.max_new_tokens, greedy.stop_strings, greedy.seed) == (
        0.0,
        32,
        ("\n\n",),
        5,
    )
    assert settings({"do_sample": True, "temperature": 0}, 32, 0).temperature == 1.0
    sampled = settings(
        {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "max_new_tokens": 3, "until": ["", "."]}, 32, 0
    )
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens) == (0.5, 0.9, 7, 3)
    assert sampled.stop_strings == (".",) and sampled.allow_image_output is False
    assert settings({"until": None, "top_p": None, "num_beams": 1}, 32, 0).stop_strings == ()
    with pytest.raises(ValueError, match="beam search"):
        settings({"num_beams": 4}, 32, 0)
    with pytest.raises(ValueError, match="until"):
        settings({"until": [3]}, 32, 0)
    with caplog.at_level(logging.WARNING, logger="eval.lmms_adapter"):
        settings({"image_aspect_ratio": "pad"}, 32, 0)
    assert "image_aspect_ratio" in caplog.text


def test_generate_until_answers_like_generate_chat_alone_or_batched(adapter_module, lm, checkpoint):
    from mllm.generation import GenerationSettings

    _, model, processor = checkpoint
    lm.task_dict = {"toy": {"test": DOCS}}
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": []}
    batched = lm.generate_until(_requests(adapter_module, gen_kwargs))
    expected = _library_replies(model, processor, GenerationSettings(max_new_tokens=6))
    assert batched == expected
    assert all(isinstance(r, str) for r in batched) and any(batched)
    assert _with_batch_size(lm, 1, _requests(adapter_module, gen_kwargs)) == batched
    shorter = lm.generate_until(_requests(adapter_module, {**gen_kwargs, "max_new_tokens": 2}))
    assert all(full.startswith(short) for short, full in zip(shorter, batched))
    assert sum(map(len, shorter)) < sum(map(len, batched))


def test_conversation_puts_unplaced_images_first_and_adds_the_system_prompt(lm, tmp_path):
    assert lm.conversation("what is it", 2) == [{"role": "user", "content": "<image>\n<image>\nwhat is it"}]
    assert lm.conversation("a <image> b", 1) == [{"role": "user", "content": "a <image> b"}]
    assert lm.conversation("no image", 0) == [{"role": "user", "content": "no image"}]
    prompt_file = tmp_path / "system.txt"
    prompt_file.write_text("Answer briefly.\n")
    previous = lm.system_prompt
    try:
        lm.system_prompt = lm._resolve_system_prompt(str(prompt_file))
        assert lm.conversation("q", 0) == [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "q"},
        ]
    finally:
        lm.system_prompt = previous


def test_generate_until_cuts_at_stop_strings_and_samples_with_the_seed(adapter_module, lm):
    lm.task_dict = {"toy": {"test": DOCS}}
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "do_sample": True, "until": []}
    free = lm.generate_until(_requests(adapter_module, sampled))
    # Request i samples from stream seed + i: the same draws alone, in other batches, or called again.
    assert _with_batch_size(lm, 1, _requests(adapter_module, sampled)) == free
    assert _with_batch_size(lm, 3, _requests(adapter_module, sampled)) == free
    row = max(range(len(free)), key=lambda i: len(free[i]))
    reply = free[row]
    assert len(reply) >= 4, reply
    stop = reply[len(reply) // 2 : len(reply) // 2 + 2]
    cut = lm.generate_until(_requests(adapter_module, {**sampled, "until": [stop]}))
    assert cut[row] == reply[: reply.find(stop)]
    assert all(stop not in text for text in cut)


def test_multi_round_runs_each_round_as_its_own_prompt_until_the_task_stops(adapter_module, lm, checkpoint):
    from lmms_eval.api.instance import Instance

    from mllm.generation import GenerationSettings

    _, model, processor = checkpoint
    follow_ups = {0: ["what shape is it", "where is it"], 1: []}  # doc 0: three rounds, doc 1: one
    docs = [DOCS[0], DOCS[1]]
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        index = next(i for i, d in enumerate(docs) if d is doc)
        seen.append((index, round_idx, list(previous_output), previous_round_info))
        if round_idx > len(follow_ups[index]):  # the task's last word on the rounds is the reply
            return None, None, True, [f"[{text}]" for text in previous_output], None
        visuals = None if round_idx == 2 else doc["images"]
        return visuals, follow_ups[index][round_idx - 1], False, previous_output, {"round": round_idx}

    gen_kwargs = {"max_new_tokens": 5, "do_sample": False, "until": []}
    requests = [
        Instance(
            request_type="generate_until_multi_round",
            arguments=(doc["question"], dict(gen_kwargs), _doc_to_visual, doc_to_text, i, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]
    lm.task_dict = {"toy": {"test": docs}}
    rounds = lm.generate_until_multi_round(requests)
    prompts = [
        {"question": DOCS[0]["question"], "images": DOCS[0]["images"]},
        {"question": "what shape is it", "images": DOCS[0]["images"]},
        {"question": "where is it", "images": []},
        {"question": DOCS[1]["question"], "images": DOCS[1]["images"]},
    ]
    single = _library_replies(model, processor, GenerationSettings(max_new_tokens=5), prompts)
    assert rounds == [[f"[{text}]" for text in single[:3]], [f"[{text}]" for text in single[3:]]]
    assert [(i, r) for i, r, _, _ in seen] == [(0, 1), (1, 1), (0, 2), (0, 3)]
    assert seen[2][2] == single[:2] and seen[2][3] == {"round": 1}


def test_bad_requests_and_model_args_fail_clearly(adapter_module, lm, tmp_path):
    lm.task_dict = {
        "toy": {
            "test": [
                {"question": "q", "images": ["clip.mp4"]},
                {"question": "<image> <image>", "images": [_image((0, 0, 0))]},
            ]
        }
    }
    requests = _requests(adapter_module, {"max_new_tokens": 2}, lm.task_dict["toy"]["test"])
    with pytest.raises(ValueError, match=r"task toy doc 0: visual 0 is 'clip.mp4'.*images \(PIL\) only"):
        lm.generate_until(requests[:1])
    with pytest.raises(
        ValueError, match="task toy doc 1: the context has 2 <image> placeholders but doc_to_visual gave 1"
    ):
        lm.generate_until(requests[1:])
    with pytest.raises(NotImplementedError, match="generate_until and generate_until_multi_round"):
        lm.loglikelihood(requests)
    with pytest.raises(ValueError, match="unknown model args"):
        adapter_module.DualTokenLMMS(pretrained="unused", temperature=1)
    with pytest.raises(ValueError, match="automatic sizing is not supported"):
        adapter_module.DualTokenLMMS(pretrained="unused", batch_size="auto:4")
    with pytest.raises(ValueError, match="max_new_tokens: expected an integer >= 1, got 0"):
        adapter_module.DualTokenLMMS(pretrained="unused", max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        adapter_module.DualTokenLMMS(pretrained=str(tmp_path))


def test_entry_point_registers_the_adapter_with_lmms_eval(adapter_module):
    from importlib.metadata import entry_points

    from lmms_eval import models

    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.name == "dualtoken"]
    manifest = point.load()()
    assert (
        manifest.model_id == "dualtoken" and manifest.simple_class_path == "eval.lmms_adapter.DualTokenLMMS"
    )
    assert models.get_model("dualtoken") is adapter_module.DualTokenLMMS


def test_python_m_lmms_eval_runs_the_shapes_task_and_matches_dualtoken_eval_vqa(
    adapter_module, checkpoint, split, tmp_path
):
    from eval.tasks import EvalSettings, run_vqa

    directory, model, processor = checkpoint
    task_dir = tmp_path / "tasks"
    assert prepare.main(["--split", str(split), "--out", str(task_dir)]) == 0
    out = tmp_path / "results"
    command = [sys.executable, "-m", "lmms_eval", "--model", "dualtoken"]
    command += ["--model_args", f"pretrained={directory},device=cpu", "--tasks", "shapes_vqa"]
    command += ["--include_path", str(task_dir), "--limit", "4", "--batch_size", "3"]
    command += ["--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval logs evaluation errors and still exits 0, so the files are the verdict.
    (results_file,) = list(out.rglob("*_results.json")) or [None]
    assert result.returncode == 0 and results_file is not None, (result.stdout + result.stderr)[-4000:]
    (samples_file,) = list(out.rglob("*_samples_shapes_vqa.jsonl"))
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    records = prepare.vqa_records(split)[:4]
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    assert [s["input"] for s in samples] == [r["question"] + SHORT_ANSWER_SUFFIX for r in records]
    assert [s["target"] for s in samples] == [r["multiple_choice_answer"] for r in records]
    answers = [
        s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        for s in samples
    ]

    # The same questions through the project's own VQA evaluation give the same answers and the same score.
    run_vqa(
        model,
        processor,
        split / "vqa_questions.json",
        split / "vqa_annotations.json",
        split / "images",
        tmp_path / "own",
        # every question: `--limit 4` takes lmms-eval's first four, a run_vqa limit draws a seeded subset
        EvalSettings(batch_size=4, limit=None, max_new_tokens=16, progress=False),
    )
    own = {}
    for line in (tmp_path / "own" / "vqa_predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        own[row["question_id"]] = row["answer"]
    assert answers == [own[r["question_id"]].strip() for r in records]
    metrics = json.loads(results_file.read_text())["results"]["shapes_vqa"]
    expected = sum(100.0 * vqa_score(a, r["answers"]) for a, r in zip(answers, records)) / 4
    assert metrics["vqa_accuracy,none"] == pytest.approx(expected)
    assert [s["vqa_accuracy"] for s in samples] == [
        100.0 * vqa_score(a, r["answers"]) for a, r in zip(answers, records)
    ]
    assert "vqa_accuracy" in result.stdout  # the summary table was printed

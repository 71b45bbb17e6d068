"""Model-driven evaluation tasks (eval/tasks.py) on a micro model and a small shapes-world test split: per-sample
files, metrics that agree with the metric modules, resume without recomputation, torn-line recovery."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from mllm_testing import build_micro, tiny_image_tokenizer, train_text_tokenizer
from PIL import Image

from data_recipes.shapes_dataset import write_shapes_dataset
from eval import t2i_tasks, tasks
from eval.tasks import EvalSettings, SampleLog, heldout_image_ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    data = root / "data"
    write_shapes_dataset(data, n=400, size=64, seed=3, verbose=False)
    text_tokenizer = train_text_tokenizer(root / "text_tokenizer")
    image_tokenizer = tiny_image_tokenizer()
    model, processor = build_micro(text_tokenizer, image_tokenizer=image_tokenizer)
    return data, model, processor


class CountingGenerate:
    """Wraps generate_chat to count the conversations it was asked to answer."""

    def __init__(self, monkeypatch):
        import mllm.generation as generation

        self.calls = 0
        original = generation.generate_chat

        def counted(model, processor, conversations, *args, **kwargs):
            self.calls += len(conversations)
            return original(model, processor, conversations, *args, **kwargs)

        monkeypatch.setattr(generation, "generate_chat", counted)


def _official_vqa(rows: list[dict], split) -> dict:
    """The official VQA accuracy of logged answers, computed directly from the metric module."""
    from eval.vqa_accuracy import evaluate_vqa

    answers = {r["question_id"]: r["answer"] for r in rows}
    return evaluate_vqa(answers, split / "vqa_questions.json", split / "vqa_annotations.json", subset=True)


def test_vqa_writes_per_sample_answers_scores_them_and_resumes(setup, tmp_path, monkeypatch):
    data, model, processor = setup
    split = data / "test"
    settings = EvalSettings(batch_size=4, limit=6, max_new_tokens=3, progress=False)
    counter = CountingGenerate(monkeypatch)
    heldout = heldout_image_ids(split / "scenes.jsonl")
    metrics = tasks.run_vqa(
        model,
        processor,
        split / "vqa_questions.json",
        split / "vqa_annotations.json",
        split / "images",
        tmp_path,
        settings,
        heldout_images=heldout,
        objects=tasks.scene_objects(split / "scenes.jsonl"),
    )
    assert counter.calls == 6
    rows = [json.loads(line) for line in (tmp_path / "vqa_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["question_id"] for r in rows}) == 6
    # The metric is the official one applied to the logged answers: recompute it independently.
    assert metrics["all"]["overall"] == pytest.approx(_official_vqa(rows, split)["overall"])
    assert metrics["all"]["num_questions"] == 6
    # Every shapes-world question lands in one question form.
    forms = metrics["all"]["per_question_form"]
    assert sum(f["questions"] for f in forms.values()) == 6
    # Color and shape forms split their wrong answers; the parts never exceed the wrong answers.
    for form, m in forms.items():
        if form.startswith(("color", "shape", "position")) and m["accuracy"] < 100.0:
            wrong = round(m["questions"] * (100.0 - m["accuracy"]) / 100.0)
            assert 0 <= m["wrong_another_object"] + m["wrong_absent"] <= wrong
    held = [r for r in rows if r["image_id"] in heldout]
    assert (metrics["heldout"] is None) == (not held)
    assert json.loads((tmp_path / "vqa_metrics.json").read_text())["all"]["num_questions"] == 6

    # A second run with a larger limit answers only the questions its (evenly spread) subset adds.
    question_ids = [
        q["question_id"] for q in json.loads((split / "vqa_questions.json").read_text())["questions"]
    ]
    added = set(tasks.spread_subset(question_ids, 8)) - set(tasks.spread_subset(question_ids, 6))
    assert added and max(tasks.spread_subset(question_ids, 6)) > question_ids[len(question_ids) // 2]
    settings.limit = 8
    tasks.run_vqa(
        model,
        processor,
        split / "vqa_questions.json",
        split / "vqa_annotations.json",
        split / "images",
        tmp_path,
        settings,
    )
    assert counter.calls == 6 + len(added)


def test_vqa_shuffled_image_control_shows_each_question_another_image_of_the_set(
    setup, tmp_path, monkeypatch
):
    import mllm.generation as generation

    data, model, processor = setup
    split = data / "test"
    shown: list[np.ndarray] = []
    original = generation.generate_chat

    def recording(model, processor, conversations, images, *args, **kwargs):
        shown.extend(np.asarray(per_conversation[0]) for per_conversation in images)
        return original(model, processor, conversations, images, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_chat", recording)
    settings = EvalSettings(batch_size=4, limit=6, max_new_tokens=3, progress=False)
    args = (
        split / "vqa_questions.json",
        split / "vqa_annotations.json",
        split / "images",
        tmp_path,
        settings,
    )
    metrics = tasks.run_vqa(model, processor, *args, shuffled_images=True)

    real = [json.loads(line) for line in (tmp_path / "vqa_predictions.jsonl").read_text().splitlines()]
    control = [
        json.loads(line) for line in (tmp_path / "vqa_shuffled_predictions.jsonl").read_text().splitlines()
    ]
    assert [r["question_id"] for r in control] == [r["question_id"] for r in real]
    pairing = tasks.shuffled_image_ids(r["image_id"] for r in real)
    assert all(r["shown_image_id"] == pairing[r["image_id"]] != r["image_id"] for r in control)

    # The model saw the paired image's pixels, not the question's own image.
    def pixels(image_id):
        return np.asarray(Image.open(split / "images" / f"{image_id:07d}.png").convert("RGB"))

    assert len(shown) == 12
    for row, image in zip(control, shown[6:]):
        assert np.array_equal(image, pixels(row["shown_image_id"]))
    assert metrics["shuffled_images"]["overall"] == pytest.approx(_official_vqa(control, split)["overall"])
    assert json.loads((tmp_path / "vqa_metrics.json").read_text())["shuffled_images"]["num_questions"] == 6

    # Resumed, nothing is asked again.
    tasks.run_vqa(model, processor, *args, shuffled_images=True)
    assert len(shown) == 12


def test_per_question_form_averages_each_form_and_splits_existence_by_its_answer():
    texts = {
        1: "What color is the cross?",
        2: "What color is the star?",
        3: "Is there a red star?",
        4: "Is there a blue circle?",
        5: "What is the man holding?",
        6: "What shape is in the center?",
    }
    truth = {
        1: {},
        2: {},
        3: {"multiple_choice_answer": "yes"},
        4: {"multiple_choice_answer": "no"},
        5: {},
        6: {},
    }
    result = {"per_question": {1: 100.0, 2: 0.0, 3: 100.0, 4: 30.0, 5: 100.0, 6: 60.0}}
    forms = tasks.per_question_form(result, texts, truth)
    assert forms == {
        "color, named by shape": {"questions": 2, "accuracy": 50.0},
        "shape, named by place": {"questions": 1, "accuracy": 60.0},
        "existence, answer no": {"questions": 1, "accuracy": 30.0},
        "existence, answer yes": {"questions": 1, "accuracy": 100.0},
    }
    assert list(forms) == ["color, named by shape", "shape, named by place", "existence, answer no",
                           "existence, answer yes"]  # fmt: skip


def test_wrong_color_and_shape_answers_split_into_another_objects_and_absent(tmp_path):
    scenes = tmp_path / "scenes.jsonl"
    red_star = {"color": "red", "shape": "star", "size": "large", "row": 0, "col": 0}
    blue_cross = {"color": "blue", "shape": "cross", "size": "small", "row": 2, "col": 2}
    scenes.write_text(
        json.dumps({"image_id": 7, "heldout": False, "scene": {"objects": [red_star, blue_cross]}})
    )
    objects = tasks.scene_objects(scenes)
    assert objects == {7: [red_star, blue_cross]}
    asked = [
        ("What color is the star?", "Blue."),  # another object's color
        ("What color is the cross?", "green"),  # a color the image does not hold
        ("What color is the star?", "red"),  # right
        ("What shape is the red object?", "circle"),
        ("What shape is the blue object?", "a big one"),  # names no shape: counted in neither part
        ("How many stars are there?", "2"),  # not split
        ("Where is the star?", "bottom right"),  # the cross's place
        ("Where is the red star?", "center"),  # an empty place
    ]
    rows = [
        {"question_id": i, "image_id": 7, "question": q, "answer": a} for i, (q, a) in enumerate(asked, 1)
    ]
    result = {"per_question": {1: 0.0, 2: 0.0, 3: 100.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0, 8: 0.0}}
    texts = {r["question_id"]: r["question"] for r in rows}
    forms = tasks.per_question_form(result, texts, {})
    tasks.add_attribute_errors(forms, rows, result, objects)
    assert forms["color, named by shape"] == {
        "questions": 3, "accuracy": 100 / 3, "wrong_another_object": 1, "wrong_absent": 1
    }  # fmt: skip
    assert forms["shape, named by color"] == {
        "questions": 2, "accuracy": 0.0, "wrong_another_object": 0, "wrong_absent": 1
    }  # fmt: skip
    for form in ("position, named by shape", "position, named by color + shape"):
        assert forms[form]["accuracy"] == 0.0
    assert forms["position, named by shape"]["wrong_another_object"] == 1
    assert forms["position, named by color + shape"]["wrong_absent"] == 1
    assert "wrong_absent" not in forms["count, of one shape"]
    scenes.write_text('{"image_id": 3, "scene": {}}\n')
    with pytest.raises(ValueError, match="image 3: expected 'scene' with a list of 'objects'"):
        tasks.scene_objects(scenes)
    scenes.write_text('{"heldout": true}\n')
    with pytest.raises(ValueError, match="line 1: expected an object with 'image_id'"):
        tasks.scene_objects(scenes)


def test_shuffled_image_pairing_is_a_derangement_of_the_images():
    pairing = tasks.shuffled_image_ids([7, 3, 3, 9, 5])
    assert pairing == {3: 5, 5: 7, 7: 9, 9: 3}
    with pytest.raises(ValueError, match="two different images"):
        tasks.shuffled_image_ids([4, 4])


def test_captions_and_chat_score_logged_outputs(setup, tmp_path):
    data, model, processor = setup
    split = data / "test"
    settings = EvalSettings(batch_size=4, limit=4, max_new_tokens=4, progress=False)
    caption_metrics = tasks.run_captions(
        model, processor, split / "captions.json", split / "images", tmp_path, settings
    )
    assert caption_metrics["num_images"] == 4 and caption_metrics["CIDEr-D"] >= 0.0
    chat_metrics = tasks.run_chat(model, processor, split / "llava.json", split, tmp_path, settings)
    rows = [json.loads(line) for line in (tmp_path / "chat_predictions.jsonl").read_text().splitlines()]
    assert chat_metrics["num_turns"] == len(rows) == 4
    assert chat_metrics["overall"] == pytest.approx(100.0 * sum(r["correct"] for r in rows) / len(rows))
    # Turn indices come from the conversations' structure: turn t asks the chat's (t+1)-th human message and is
    # scored against the assistant message after it.
    chats = {r["id"]: r["conversations"] for r in json.loads((split / "llava.json").read_text())}
    for row in rows:
        record_id, turn = row["sample_id"].rsplit("/", 1)
        assert int(turn) == row["turn"]
        assert row["question"] == chats[record_id][2 * row["turn"]]["value"]
        assert row["reference"] == chats[record_id][2 * row["turn"] + 1]["value"]


def test_chat_scoring_accepts_the_reference_reply(setup, tmp_path, monkeypatch):
    """A model that repeats the reference sentence scores 100%; one that says something else scores 0%."""
    data, model, processor = setup
    split = data / "test"
    import mllm.generation as generation
    from mllm.generation import ChatReply

    # The oracle knows a conversation by its text alone, so keep chats whose text prefixes are all distinct (one
    # chat per opening request): then every turn names its record.
    chats, seen = [], set()
    for record in json.loads((split / "llava.json").read_text()):
        opening = record["conversations"][0]["value"]
        if record["id"].endswith("-chat") and opening not in seen:
            seen.add(opening)
            chats.append(record)
    assert len(chats) >= 2
    conversations_file = tmp_path / "chats.json"
    conversations_file.write_text(json.dumps(chats))

    def oracle(model, processor, conversations, images, settings):
        replies = []
        for conversation in conversations:
            for record in chats:
                values = [m["value"] for m in record["conversations"]]
                n = len(conversation)
                if values[:n] == [m["content"] for m in conversation]:
                    replies.append(ChatReply(values[n].upper(), values[n], []))
                    break
        return replies

    monkeypatch.setattr(generation, "generate_chat", oracle)
    settings = EvalSettings(batch_size=3, limit=None, progress=False)
    assert (
        tasks.run_chat(model, processor, conversations_file, split, tmp_path / "a", settings)["overall"]
        == 100.0
    )
    monkeypatch.setattr(
        generation, "generate_chat", lambda m, p, c, i, s: [ChatReply("a purple moon.", "", []) for _ in c]
    )
    assert (
        tasks.run_chat(model, processor, conversations_file, split, tmp_path / "b", settings)["overall"]
        == 0.0
    )


# Without a nucleus cut-off, float noise from left padding cannot flip a sampled code across the top-p boundary.
EXACT = {"image_top_p": 1.0, "image_top_k": 0}


def test_t2i_images_do_not_depend_on_batch_size_or_resume_point(setup, tmp_path):
    data, model, processor = setup
    # In float64: a float32 batch of two rounds differently from a batch of one (about 1e-7), which can flip one
    # sampled code and with it every later one (seen on one CPU, not on another); float64 leaves no such near-ties.
    model = copy.deepcopy(model).double()
    processor = copy.copy(processor)
    processor.image_tokenizer = copy.deepcopy(processor.image_tokenizer).double()
    prompts = data / "test" / "prompts.jsonl"
    one = t2i_tasks.run_t2i(
        model,
        processor,
        prompts,
        tmp_path / "one",
        EvalSettings(batch_size=1, limit=3, progress=False),
        generation_overrides=EXACT,
    )
    # Batched run, interrupted after two prompts and resumed.
    t2i_tasks.run_t2i(
        model,
        processor,
        prompts,
        tmp_path / "many",
        EvalSettings(batch_size=2, limit=2, progress=False),
        generation_overrides=EXACT,
    )
    t2i_tasks.run_t2i(
        model,
        processor,
        prompts,
        tmp_path / "many",
        EvalSettings(batch_size=2, limit=3, progress=False),
        generation_overrides=EXACT,
    )
    files = sorted(p.name for p in (tmp_path / "one" / "t2i_images").glob("*.png"))
    assert len(files) == 3
    for name in files:
        # Same codes; the decoder's float result may differ by one 8-bit level between batch shapes.
        a = np.asarray(Image.open(tmp_path / "one" / "t2i_images" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "many" / "t2i_images" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
    assert one["all"] is not None
    verdicts = [
        json.loads(line) for line in (tmp_path / "one" / "t2i_verdicts.jsonl").read_text().splitlines()
    ]
    assert len(verdicts) == 3 and all(isinstance(v["satisfied"], bool) for v in verdicts)


def test_t2i_reference_scores_the_prompts_own_images_and_their_reconstructions(setup, tmp_path):
    data, model, processor = setup
    settings = EvalSettings(batch_size=3, limit=4, progress=False)
    metrics = t2i_tasks.run_t2i(
        model, processor, data / "test" / "prompts.jsonl", tmp_path, settings, generation_overrides=EXACT,
        reference=True,
    )  # fmt: skip
    real, reconstructed = metrics["reference"]["real"], metrics["reference"]["reconstructed"]
    assert real["num_samples"] == reconstructed["num_samples"] == 4
    assert real["overall"] == 1.0  # the parser verifies every prompt on the image it was written from
    assert (
        reconstructed["overall"] < 1.0
    )  # the micro tokenizer is untrained: its reconstructions are not the data
    saved = json.loads((tmp_path / "t2i_metrics.json").read_text())
    assert saved["reference"] == metrics["reference"]
    use = metrics["reference"]["caption_use"]
    assert set(use) == {"pixel", "semantic"}
    depth = model.config.rq_depth
    assert all(len(use[h][c]) == depth for h in use for c in ("own_caption", "shifted_caption", "zero_state"))
    # The micro model is random: a caption changes its image losses, in one direction or the other.
    assert use["pixel"]["own_caption"] != use["pixel"]["shifted_caption"]
    entropy = metrics["reference"]["code_entropy"]
    assert entropy["cells"] == 4 * model.config.num_image_positions
    assert set(entropy["pixel"]) == {"marginal", "given_place", "given_content", "given_place_and_content"}

    specs = [json.loads(line) for line in (data / "test" / "prompts.jsonl").read_text().splitlines()[:2]]
    with pytest.raises(ValueError, match="'file'"):
        t2i_tasks.t2i_reference_scores(
            processor, [{**s, "file": None} for s in specs], data / "test", settings
        )


def test_sample_log_drops_a_torn_last_line_and_rejects_corruption_elsewhere(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1, "x": 2}\n{"id": 2, "x"')
    log = SampleLog(path, "id")
    assert 1 in log and 2 not in log
    log.extend([{"id": 2, "x": 5}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"id": 1\n{"id": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl:1"):
        SampleLog(path, "id")


def test_generation_is_deterministic_for_the_micro_model(setup):
    """Guards the premise of the resume tests: two greedy runs over the same batch agree."""
    _, model, processor = setup
    from mllm.generation import GenerationSettings, generate_images

    a = generate_images(model, processor, ["a red circle"], GenerationSettings.tiny(seed=4), decode=False)
    b = generate_images(model, processor, ["a red circle"], GenerationSettings.tiny(seed=4), decode=False)
    assert torch.equal(a.pixel_codes, b.pixel_codes)


def test_eval_cli_runs_a_saved_model_and_writes_metrics(setup, tmp_path, capsys):
    from mllm.console import main

    data, model, processor = setup
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, processor=processor)
    split = data / "test"
    common = ["--model", str(model_dir), "--limit", "3", "--batch-size", "3", "--max-new-tokens", "2"]
    assert (
        main(
            [
                "eval",
                "vqa",
                *common,
                "--out",
                str(tmp_path / "vqa"),
                "--questions",
                str(split / "vqa_questions.json"),
                "--annotations",
                str(split / "vqa_annotations.json"),
                "--image-root",
                str(split / "images"),
                "--scenes",
                str(split / "scenes.jsonl"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["all"]["num_questions"] == 3
    assert json.loads((tmp_path / "vqa" / "vqa_metrics.json").read_text()) == printed
    assert (
        main(
            [
                "eval",
                "t2i",
                *common,
                "--out",
                str(tmp_path / "t2i"),
                "--prompts",
                str(split / "prompts.jsonl"),
                "--n",
                "2",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "t2i" / "t2i_images").glob("*.png"))) == 6


def test_a_limit_draws_a_seeded_subset_over_the_whole_file():
    from eval.tasks import spread_subset

    items = list(range(600))
    picked = spread_subset(items, 60)
    assert picked == sorted(set(picked)) and len(picked) == 60 and picked == spread_subset(items, 60)
    assert min(picked) < 300 <= max(picked)  # reaches the held-out second half of a shapes-world test split
    assert {i % 3 for i in picked} == {0, 1, 2}  # every question of the per-image pattern, no stride aliasing
    assert spread_subset(list(range(4)), 10) == [0, 1, 2, 3] and spread_subset(list(range(4)), None) == [
        0,
        1,
        2,
        3,
    ]


def test_generated_vs_real_fd_is_zero_for_the_real_set_and_grows_for_noise(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from data_recipes.shapes_dataset import write_shapes_dataset

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "teacher")
    write_shapes_dataset(tmp_path / "data", n=120, size=32, workers=0, verbose=False)
    real_dir = tmp_path / "data" / "test" / "images"
    real = [Image.open(p).convert("RGB") for p in sorted(real_dir.glob("*.png"))]
    same = t2i_tasks.generated_vs_real_fd(real, real_dir, tmp_path / "teacher")
    assert same["generated"] == same["real"] == len(real) and abs(same["value"]) < 1e-3
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in real]
    assert t2i_tasks.generated_vs_real_fd(noise, real_dir, tmp_path / "teacher")["value"] > 1.0
    with pytest.raises(ValueError, match="need >= 2 images"):
        t2i_tasks.generated_vs_real_fd(real[:1], real_dir, tmp_path / "teacher")


def test_eval_t2i_sampling_flags_reach_the_generation_settings(monkeypatch, capsys):
    import eval.cli as cli
    import eval.t2i_tasks as t2i_tasks
    from mllm.console import main

    seen = []
    monkeypatch.setattr(cli, "_load", lambda args: ("model", "processor"))

    def fake_run(model, processor, prompts, out, settings, n, generation_overrides=None, **kwargs):
        seen.append(generation_overrides)
        return {"overall": 0.0}

    monkeypatch.setattr(t2i_tasks, "run_t2i", fake_run)
    base = ["eval", "t2i", "--model", "m", "--out", "o", "--prompts", "p.jsonl"]
    assert main(base) == 0
    flags = ["--cfg", "6", "--cfg-plausibility", "0", "--image-temperature", "0.7", "--image-top-k", "8"]
    assert main([*base, *flags, "--image-top-p", "0.9"]) == 0
    assert seen == [
        None,
        {
            "cfg_scale": 6.0,
            "cfg_plausibility": 0.0,
            "image_temperature": 0.7,
            "image_top_k": 8,
            "image_top_p": 0.9,
        },
    ]
    for bad, field in ((["--image-top-p", "2"], "image_top_p"), (["--cfg", "-1"], "cfg_scale")):
        assert main([*base, *bad]) == 2
        assert f"dualtoken eval t2i: error: GenerationSettings.{field}" in capsys.readouterr().err
    assert len(seen) == 2  # refused before loading or drawing anything
